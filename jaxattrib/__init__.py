"""jaxattrib: data attribution and copyright authentication for diffusion models, in JAX.

Pure functions at the core (params and batches in, arrays out); files, logging and progress at
the edges (``jaxattrib.cli``, ``jaxattrib.report``). Images and latents are NHWC everywhere.
"""


def _version() -> str:
    """The installed distribution's version (``importlib.metadata``); in a source tree that is
    not installed, ``pyproject.toml``'s ``project.version`` with a ``+src`` local label; else
    ``0+unknown``."""
    from importlib import metadata
    try:
        return metadata.version("jaxattrib")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib
        from pathlib import Path
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return f"{tomllib.load(f)['project']['version']}+src"
    except (OSError, KeyError, ValueError):
        return "0+unknown"


__version__: str = _version()
