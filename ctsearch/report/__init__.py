"""Figures (``figures``: slices with RELAX heat maps, as PNG) and the HTML report (``html``).

Example:
    >>> from ctsearch.report import collect_inputs, write_report
    >>> write_report(collect_inputs(["demo-out/"]), "report.html")["sections"]  # doctest: +SKIP
    ['runs', 'evaluation', 'query', 'explain', 'index', 'prepared']
"""

from ctsearch.report.figures import explanation_panel, grid, overlay, png_bytes, query_figure, slice_rgb
from ctsearch.report.html import ReportInputs, build_report, collect_inputs, line_chart_svg, write_report

__all__ = [
    "ReportInputs",
    "build_report",
    "collect_inputs",
    "explanation_panel",
    "grid",
    "line_chart_svg",
    "overlay",
    "png_bytes",
    "query_figure",
    "slice_rgb",
    "write_report",
]
