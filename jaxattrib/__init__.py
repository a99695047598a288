"""jaxattrib: data attribution and copyright authentication for diffusion models, in JAX.

Pure functions at the core (params and batches in, arrays out); files, logging and progress at
the edges (``jaxattrib.cli``, ``jaxattrib.report``). Images and latents are NHWC everywhere.
"""

__version__ = "0.1.0"
