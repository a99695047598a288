"""The attribution method names, their families and the ``jaxattrib attribute`` defaults.

Plain constants, free of JAX and NumPy, so the command line builds ``--method``'s choices and
its help's defaults from them without importing JAX. [design] One source: the method
registry (:data:`jaxattrib.attribution.methods.METHODS`), ``diffusion_trak.METHODS`` /
``DEFAULT_CHECKPOINTS``, the CLI's ``Method`` choices and
``jaxattrib.runs.attribute.ATTRIBUTE_DEFAULTS`` are these.
"""

from __future__ import annotations

FAMILIES = ("trak", "tracin", "concept-trak", "montrage", "similarity", "random")

# method name -> family (jaxattrib.attribution.methods' module doc), in the registry's order
METHOD_FAMILIES = {"dtrak": "trak", "trak": "trak", "journey-trak": "trak", "tracin": "tracin",
                   "concept-trak": "concept-trak", "montrage": "montrage",
                   "montrage-final": "montrage", "pixel": "similarity", "random": "random"}

# featurized by per-example gradients of diffusion_trak's output functions: what
# AttributionConfig, the Attributor and `jaxattrib attribute --method` take
GRADIENT_METHODS = tuple(n for n, f in METHOD_FAMILIES.items() if f in ("trak", "tracin"))

# `attribution.checkpoints` when not given: D-TRAK 1 (its protocol [code]), TRAK and
# Journey-TRAK the last 3 [design] (diffusion_trak's module doc); TracIn: every checkpoint
DEFAULT_CHECKPOINTS = {"dtrak": 1, "trak": 3, "journey-trak": 3}

# `jaxattrib attribute` options a run's config.json `attribution` section does not set
ATTRIBUTE_DEFAULTS = {"method": "dtrak", "k": 2048, "params": "attn", "num_timesteps": 10,
                      "lam_ratio": 1.0, "topk": 10, "projection": "rademacher",
                      "microbatch": 8, "precision": "float32", "remat": "none",
                      "matmul_precision": "default", "chunk_size": 64,
                      "noise": "shared", "checkpoints": None}

__all__ = ["ATTRIBUTE_DEFAULTS", "DEFAULT_CHECKPOINTS", "FAMILIES", "GRADIENT_METHODS",
           "METHOD_FAMILIES"]
