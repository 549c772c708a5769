"""`fedpeft-edge lab`: a federated run over emulated links (namespaces, tc, relays), with its network report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config with a lab_args section")
    parser.add_argument("--links", default=None,
                        help="a link profile YAML (every device on it) or a directory of profiles "
                             "(default: lab_args.links_dir, else configs/links/)")
    parser.add_argument("--work-dir", default=None, help="logs and relay byte logs (default: RUN_DIR/lab)")
    parser.add_argument("--no-report", action="store_true", help="skip the timeline, bytes and prediction report")
    parser.add_argument("--report-only", metavar="WORK_DIR", default=None,
                        help="write the report of a finished lab run again from its work directory (no root needed)")
    parser.add_argument("--cleanup", action="store_true",
                        help="only remove namespaces that killed lab runs left behind, then exit")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.errors import ConfigError
    from fedpeft_edge.lab.netns import cleanup_stale, require_privileges

    if args.cleanup:
        require_privileges()
        removed = cleanup_stale()
        print(f"removed {len(removed)} namespace(s)" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    if args.report_only:
        if not args.config:
            raise ConfigError("--report-only needs the run's --config too (for the prediction)")
        from fedpeft_edge.config import load_config
        from fedpeft_edge.lab.report import write_lab_report
        from fedpeft_edge.lab.runner import LabResult

        report = write_lab_report(LabResult.load(Path(args.report_only)), load_config(args.config))
        print(report.table)
        return 0
    if not args.config:
        raise ConfigError("pass --config RUN.yaml (a run config with a lab_args section), or --cleanup")
    from fedpeft_edge.config import load_config
    from fedpeft_edge.lab.runner import LabRun

    cfg = load_config(args.config)
    run_dir = Path(cfg.tracking_args.run_dir) / cfg.common_args.run_id
    work = Path(args.work_dir) if args.work_dir else run_dir / "lab"
    lab = LabRun(cfg, Path(args.config), work, args.links)
    for device_id, prof in lab.links.items():
        print(f"{device_id}: {prof.name} (down {prof.down_mbit} / up {prof.up_mbit} Mbit/s, "
              f"+{prof.latency_ms} ms, loss {prof.loss})")
    result = lab.run()
    print(f"server exited with {result.server_rc}; run directory {result.run_dir}")
    if not args.no_report:
        from fedpeft_edge.lab.report import write_lab_report

        report = write_lab_report(result, cfg)
        print(report.table)
        print(f"lab report: {', '.join(str(p) for p in report.files)}")
    return 0 if result.server_rc == 0 else 1
