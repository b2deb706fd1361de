"""Reports: rich tables, JSON, CSV, progress bars. The only package that imports rich.

rich itself is imported inside the functions that draw (``bnstat --help``
never imports it). Modules: ``console`` (the console and ``emit_rich``),
``tables``, ``records`` (JSON, CSV), ``progressbar``, ``fold`` (the fold plan),
``hist`` (histogram reports), ``training`` (running, recalibrate, diff reports).
"""

from bnstat.render.console import emit_rich
from bnstat.render.progressbar import progress
from bnstat.render.records import to_json, write_csv
from bnstat.render.tables import human_size, print_info, print_lines, print_tables

__all__ = ["emit_rich", "human_size", "print_info", "print_lines", "print_tables", "progress",
           "to_json", "write_csv"]
