"""The run report: a run directory's records as report.html, PNG plots and CSV tables (`fedpeft-edge report`)."""

from fedpeft_edge.report.run_report import NOT_AVAILABLE, ReportFiles, load_run, write_report

__all__ = ["NOT_AVAILABLE", "ReportFiles", "load_run", "write_report"]
