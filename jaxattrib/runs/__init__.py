"""The commands' layer: one module per command plus what they share.

Each module here turns a config and a run directory into files (records, feature stores,
scores, reports) by calling the methods (``jaxattrib.attribution``, ``jaxattrib.authentication``)
and the layers below them. It is the only layer that knows the run-directory layout
(:mod:`jaxattrib.runs.rundir`). ``jaxattrib.cli`` and ``jaxattrib.launch`` sit above it.
"""
