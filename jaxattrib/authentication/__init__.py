"""Copyright authentication of diffusion models (methods layer, beside ``jaxattrib.attribution``).

* :mod:`~jaxattrib.authentication.cgi_dm`: CGI-DM membership scores (mask, PGD recovery,
  similarity) and the calibrated decision;
* :mod:`~jaxattrib.authentication.similarity`: the image/feature similarities CGI-DM and
  MONTRAGE use;
* :mod:`~jaxattrib.authentication.source_model`: source-model attribution (generated images of
  a suspect model vs a source model's key samples);
* :mod:`~jaxattrib.authentication.watermark`: the watermark baseline.

The commands that write run directories for these live in :mod:`jaxattrib.runs`.
"""
