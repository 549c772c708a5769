"""`fedpeft-edge report RUN_DIR [RUN_DIR ...] [--out DIR]`: report.html, PNG plots and CSVs from runs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (runs/<run_id>) written by fedpeft-server; several = compared")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default: RUN_DIR/report; for several runs report-<a>-vs-<b>)")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.report import write_report

    files = write_report(args.run_dirs, args.out)
    print(f"report: {files.html}")
    for name, path in {**files.plots, **files.csvs}.items():
        print(f"  {name:<20} {path}")
    return 0
