"""Self-contained HTML reports with PNG image grids and plots (see :mod:`.html` for the run
directory's ``results/*.json`` format)."""

from jaxattrib.report.html import (Report, ReportError, read_results, render_run_report,
                                   write_result)
from jaxattrib.report.images import image_grid, png_data_uri, save_png, to_uint8, topk_image

__all__ = ["Report", "ReportError", "read_results", "render_run_report", "write_result",
           "image_grid", "png_data_uri", "save_png", "to_uint8", "topk_image"]
