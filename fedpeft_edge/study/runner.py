"""Runs a study: plans its runs, skips the finished ones, executes the rest, then writes the study report.

Study directory: `study.json` (the plan and each run's state), `configs/<run_id>.yaml` (what each run was
given), `runs/<run_id>/` (ordinary run directories), `logs/<run_id>.log` (each run's program output) and the
comparison report. A run counts as finished when its summary.json exists and the config.yaml its server
saved hashes (study.grid.config_hash) to the planned config's hash; a half-finished run directory is
removed and the run starts afresh; a finished run made under another config (or one whose config.yaml
this version no longer loads) is moved aside as
`runs/<run_id>.stale-<time>` before it is redone. Each run's devices keep their state (privacy ledgers) in
`state/<run_id>/`, emptied whenever the run starts, so one run's spent budget never carries into another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft_edge.config import StudyConfig, config_to_dict, dump_config, load_config, replace_in
from fedpeft_edge.errors import ConfigError, FedPeftError, StudyError
from fedpeft_edge.rundir import describe_divergence
from fedpeft_edge.study.executor import Executor
from fedpeft_edge.study.grid import PlannedRun, config_hash, expand_study

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class StudyOutcome:
    """What one `StudyRunner.run` did."""

    planned: int
    skipped: tuple[str, ...]  # finished before this call
    executed: tuple[str, ...]
    failed: dict[str, str]  # run id -> error
    report: Path | None


def default_study_dir(study: StudyConfig) -> Path:
    if study.study_dir:
        return Path(study.study_dir)
    return Path(load_config(study.base_config).tracking_args.run_dir) / "studies" / study.name


def run_state(run_dir: Path, expected_hash: str) -> str:
    """'finished', 'stale' (finished under another config), 'partial' (started, not finished) or 'new'."""
    if not run_dir.exists():
        return "new"
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary.is_file() or not saved.is_file():
        return "partial"
    try:
        json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError) as exc:
        log.warning("%s: unreadable summary.json (%s); the run will be redone", run_dir, exc)
        return "partial"
    try:
        saved_hash = config_hash(load_config(saved))
    except (OSError, FedPeftError) as exc:  # e.g. written by an older version: keep it aside, redo the run
        log.warning("%s: its config.yaml no longer loads (%s); the run counts as stale", run_dir, exc)
        return "stale"
    return "finished" if saved_hash == expected_hash else "stale"


class StudyRunner:
    """Executes a study's runs through an executor; resumable; one progress line per event."""

    def __init__(self, study: StudyConfig, executor: Executor, study_dir: str | Path | None = None,
                 progress: Progress | None = None) -> None:
        self.study = study
        self.executor = executor
        self.dir = Path(study_dir) if study_dir is not None else default_study_dir(study)
        self.runs_dir = self.dir / "runs"
        self.progress: Progress = progress or log.info
        self.plan = expand_study(study)

    def run_dir(self, run: PlannedRun) -> Path:
        return self.runs_dir / run.run_id

    def states(self) -> dict[str, str]:
        return {r.run_id: run_state(self.run_dir(r), r.config_hash) for r in self.plan}

    def run(self, only: set[str] | None = None, write_report: bool = True) -> StudyOutcome:
        """Execute every run not finished yet (or only those ids), then write the study report."""
        if only:
            unknown = sorted(only - {r.run_id for r in self.plan})
            if unknown:
                raise ConfigError(f"--only {', '.join(unknown)}: not run ids of study {self.study.name!r}; "
                                  "`fedpeft-edge study FILE --list` prints them")
        self.dir.mkdir(parents=True, exist_ok=True)
        states = self.states()
        todo = [r for r in self.plan if states[r.run_id] != "finished" and (not only or r.run_id in only)]
        skipped = tuple(r.run_id for r in self.plan if states[r.run_id] == "finished")
        self.progress(f"study {self.study.name}: {len(self.plan)} runs, {len(skipped)} finished earlier "
                      f"(skipped), {len(todo)} to run through {self.executor.name}; directory {self.dir}")
        self._write_plan(states)
        executed: list[str] = []
        failed: dict[str, str] = {}
        t0 = time.monotonic()
        for n, run in enumerate(todo, start=1):
            self._announce(n, len(todo), run, t0, len(executed) + len(failed))
            try:
                self._execute(run, states[run.run_id], f"[{n}/{len(todo)}] {run.run_id}")
                executed.append(run.run_id)
            except FedPeftError as exc:
                failed[run.run_id] = str(exc)
                self.progress(f"[{n}/{len(todo)}] {run.run_id}: FAILED: {exc}")
            states[run.run_id] = run_state(self.run_dir(run), run.config_hash)
            self._write_plan(states, failed)
        report = self.write_report() if write_report else None
        return StudyOutcome(len(self.plan), skipped, tuple(executed), failed, report)

    def write_report(self) -> Path | None:
        from fedpeft_edge.study.report import write_study_report

        finished = [r for r in self.plan if run_state(self.run_dir(r), r.config_hash) == "finished"]
        if not finished:
            self.progress(f"study {self.study.name}: no finished run yet; no report written")
            return None
        page = write_study_report(self.study, finished, self.runs_dir, self.dir)
        self.progress(f"study report ({len(finished)}/{len(self.plan)} runs): {page}")
        return page

    # --- one run ------------------------------------------------------------------------------------------

    def twin(self, run: PlannedRun) -> Path | None:
        """A finished run of the same experiment (equal config hash) in a sibling study of the same parent
        directory: the base runs the heterogeneity, compression and stability studies share."""
        parent = self.dir.parent
        if not parent.is_dir():
            return None
        for summary in sorted(parent.glob("*/runs/*/summary.json")):
            other = summary.parent
            if other.parent.parent == self.dir or other.name.count(".stale-"):
                continue
            if run_state(other, run.config_hash) == "finished":
                return other
        return None

    def _execute(self, run: PlannedRun, state: str, tag: str) -> None:
        run_dir = self.run_dir(run)
        twin = self.twin(run) if state == "new" else None
        if twin is not None:
            shutil.copytree(twin, run_dir)
            _write_json(self.dir / "logs" / f"{run.run_id}.json", {
                "run_id": run.run_id, "executor": "reused", "config_hash": run.config_hash, "reused": str(twin),
                "started": time.time(), "wall_s": 0.0, "error": None, "divergences": []})
            self.progress(f"{tag}: the same experiment finished in {twin}; reused (copied), not run again")
            return
        if state == "partial":
            self.progress(f"{tag}: half-finished run directory removed; starting it afresh")
            shutil.rmtree(run_dir)
        elif state == "stale":
            aside = run_dir.with_name(f"{run.run_id}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            self.progress(f"{tag}: finished under another config; moved to {aside.name}, running again")
            run_dir.rename(aside)
        state_dir = self.dir / "state" / run.run_id  # the devices' privacy ledgers: one fresh set per run
        if state_dir.exists():
            shutil.rmtree(state_dir)
        cfg = replace_in(run.config, **{"tracking_args.run_dir": str(self.runs_dir),
                                        "device_args.state_dir": str(state_dir)})
        config_path = self.dir / "configs" / f"{run.run_id}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, config_path)
        watcher = _RunProgress(tag, cfg.train_args.comm_round, self.progress)
        started = time.time()
        error: str | None = None
        try:
            self.executor.execute(run, config_path, run_dir, self.dir / "logs" / f"{run.run_id}.log",
                                  watcher, self.study.run_timeout_s)
            if run_state(run_dir, run.config_hash) != "finished":
                raise StudyError(f"run {run.run_id}: the executor returned but {run_dir} holds no summary.json "
                                 "with this run's config; see its log in " + str(self.dir / "logs"))
        except FedPeftError as exc:
            error = str(exc)
            raise
        finally:
            _write_json(self.dir / "logs" / f"{run.run_id}.json", {
                "run_id": run.run_id, "executor": self.executor.name, "config_hash": run.config_hash,
                "started": started, "wall_s": time.time() - started, "error": error,
                "divergences": watcher.divergences})
        self.progress(f"{tag}: done in {time.time() - started:.0f}s{watcher.final()}")

    def _announce(self, n: int, total: int, run: PlannedRun, t0: float, done: int) -> None:
        elapsed = time.monotonic() - t0
        eta = f", about {elapsed / done * (total - n + 1) / 60:.0f} min left" if done else ""
        values = ", ".join(f"{k}={v}" for k, v in run.assignment)
        self.progress(f"[{n}/{total}] {run.run_id} starting ({values}); study elapsed {elapsed / 60:.1f} min{eta}")

    def _write_plan(self, states: dict[str, str], failed: dict[str, str] | None = None) -> None:
        _write_json(self.dir / "study.json", {
            "name": self.study.name, "base_config": self.study.base_config, "executor": self.executor.name,
            "grid": {k: v for k, v in self.study.grid.items()},
            "runs": [{"index": r.index, "run_id": r.run_id, "values": r.values, "config_hash": r.config_hash,
                      "state": states.get(r.run_id), "error": (failed or {}).get(r.run_id),
                      "overrides": r.overrides} for r in self.plan],
            "base": config_to_dict(load_config(self.study.base_config)),
        })


class _RunProgress:
    """The record sink of one run: a progress line per round and per divergence flag."""

    def __init__(self, tag: str, rounds: int, progress: Progress) -> None:
        self.tag, self.rounds, self.progress = tag, rounds, progress
        self.divergences: list[dict[str, Any]] = []
        self.last_top1: float | None = None
        self.cum_bytes = 0

    def __call__(self, rec: dict[str, Any]) -> None:
        kind = rec.get("kind")
        if kind == "round" and rec.get("status", "aggregated") == "aggregated":
            ev = rec.get("eval") or {}
            top1 = ev.get("top1")
            self.last_top1 = top1 if isinstance(top1, (int, float)) else self.last_top1
            self.cum_bytes = int(rec.get("cum_bytes") or 0)
            acc = f"{100 * top1:.1f}%" if isinstance(top1, (int, float)) else "-"
            self.progress(f"{self.tag} round {rec.get('round')}/{self.rounds}: top-1 {acc}, "
                          f"{_count(rec.get('accepted'))} updates, {self.cum_bytes / 1e6:.2f} MB so far, "
                          f"{float(rec.get('round_s') or 0.0):.1f}s")
        elif kind == "divergence":
            self.divergences.append(rec)
            self.progress(f"{self.tag} DIVERGENCE {describe_divergence(rec)}")

    def final(self) -> str:
        acc = f", final top-1 {100 * self.last_top1:.1f}%" if self.last_top1 is not None else ""
        flags = f", {len(self.divergences)} divergence flag(s)" if self.divergences else ""
        return f"{acc}, {self.cum_bytes / 1e6:.2f} MB{flags}"


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, (list, tuple, dict)) else value


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)
