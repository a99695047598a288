"""Data attribution for diffusion models: the public face.

``Attributor`` featurizes a training set once and scores queries, ``[Q, N]`` (queries ×
training examples) [design: issue 20]; ``AttributionConfig``, ``featurize_examples`` and
``scores_from_features`` are the functions it is built on (``diffusion_trak``);
``METHODS`` / ``method_scores`` the one method-name → scores dispatch (``methods``).
Imported lazily, so ``import jaxattrib.attribution.store`` stays free of JAX.
"""

from __future__ import annotations

from jaxattrib.lazy_exports import lazy_exports

_EXPORTS = {
    "Attributor": "jaxattrib.attribution.attributor",
    "AttributionConfig": "jaxattrib.attribution.diffusion_trak",
    "featurize_examples": "jaxattrib.attribution.diffusion_trak",
    "scores_from_features": "jaxattrib.attribution.diffusion_trak",
    "METHODS": "jaxattrib.attribution.methods",
    "method_scores": "jaxattrib.attribution.methods",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
