"""Copyright authentication of diffusion models (methods layer, beside ``jaxattrib.attribution``).

The public face [design: issue 20]: ``Authenticator`` (CGI-DM: was this image used to
fine-tune that model? ``.calibrate`` / ``.score [N]`` / ``.decide``) and
``SourceModelAttributor`` (was that model trained on my model's generations?), with
``CGIDMConfig`` and the one CGI-DM decision ``decide``. Imported lazily (on first use), as
``jaxattrib.attribution``'s. The modules underneath:

* :mod:`~jaxattrib.authentication.cgi_dm`: CGI-DM membership scores (mask, PGD recovery,
  similarity) and the calibrated decision;
* :mod:`~jaxattrib.authentication.similarity`: the image/feature similarities CGI-DM and
  MONTRAGE use;
* :mod:`~jaxattrib.authentication.source_model`: source-model attribution (generated images of
  a suspect model vs a source model's key samples);
* :mod:`~jaxattrib.authentication.watermark`: the watermark baseline.

The commands that write run directories for these live in :mod:`jaxattrib.runs`.
"""

from __future__ import annotations

from jaxattrib.lazy_exports import lazy_exports

_EXPORTS = {
    "Authenticator": "jaxattrib.authentication.authenticator",
    "SourceModelAttributor": "jaxattrib.authentication.source_attributor",
    "CGIDMConfig": "jaxattrib.authentication.cgi_dm_pgd",
    "decide": "jaxattrib.authentication.cgi_dm",
    "KeySamples": "jaxattrib.authentication.source_model",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
