"""A study's comparison report: study_report.html (self-contained), PNG plots and CSVs in the study directory.

Runs are grouped by their grid values without the seed; each group's figures are the mean over its seeds,
with the spread (std, min, max). Everything is read from the run directories (metrics.jsonl, summary.json,
config.yaml): accuracy is the server's evaluation, bytes are what was metered (on the wire for the MQTT
executor; encoded, as the simulator records them, for `simulate`).
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpeft_edge.config import StudyConfig  # noqa: E402
from fedpeft_edge.records import DeviceRoundRecord, DivergenceRecord, RunSummary  # noqa: E402
from fedpeft_edge.report.run_report import RunData, html_table, load_run, round_rows, write_csv  # noqa: E402
from fedpeft_edge.rundir import describe_divergence, read_records  # noqa: E402
from fedpeft_edge.study.grid import SEED_KEY, PlannedRun, axis_label  # noqa: E402

MB = 1e6
FINAL_COLUMNS = ("group", "method", "runs", "seeds", "top1_mean", "top1_std", "top1_min", "top1_max",
                 "best_top1_mean", "mb_total_mean", "mb_per_round_mean", "epsilon_mean", "divergent_runs")
DIVERGENCE_COLUMNS = ("run", "round", "device_id", "learning_rate", "metric", "value", "threshold", "message")
BYTES_COLUMNS = ("group", "round", "mb_up_mean", "mb_down_mean", "mb_total_mean")


class _Run:
    """A finished run of the study, loaded."""

    def __init__(self, planned: PlannedRun, data: RunData) -> None:
        self.planned, self.data = planned, data
        # one table row per round record, in order: keep the aggregated attempts (a retried round's last)
        self.rounds = [row for row, rec in zip(round_rows(data), data.rounds, strict=True)
                       if (rec.status or "aggregated") == "aggregated"]
        self.group = ", ".join(f"{axis_label(k)}={v}" for k, v in planned.assignment if k != SEED_KEY) or "all runs"
        self.divergences = read_records(data.path, DivergenceRecord)
        self.summary = data.summary or RunSummary()  # a run without summary.json: every figure missing
        eps = [_last_epsilon(data.device_rounds, dev) for dev in {d.device_id for d in data.device_rounds}]
        present = [e for e in eps if e is not None]
        self.epsilon = max(present) if present else None

    @property
    def final_top1(self) -> float | None:
        return _num(self.summary.final_top1)

    def row(self) -> dict[str, Any]:
        s, cfg = self.summary, self.planned.config
        return {"run": self.planned.run_id, **self.planned.values, "method": cfg.peft_args.method,
                "learning_rate": cfg.train_args.learning_rate, "rounds": s.rounds,
                "final_top1": s.final_top1, "best_top1": s.best_top1,
                "final_perplexity": s.final_perplexity,
                "mb_total": _scaled(s.bytes_total), "mb_per_round": _scaled(s.bytes_per_round),
                "epsilon": self.epsilon, "divergences": len(self.divergences),
                "rounds_flagged": " ".join(str(x) for x in self.rounds_flagged),
                "end_reason": s.end_reason}

    @property
    def rounds_flagged(self) -> list[Any]:
        """The rounds with a divergence flag: one round-1 flag is often a cold start, every round is not."""
        return sorted({d.round for d in self.divergences}, key=lambda x: _num(x) or 0.0)


def write_study_report(study: StudyConfig, planned: Sequence[PlannedRun], runs_dir: Path, out: Path) -> Path:
    """Write study_report.html, the PNGs and the CSVs for the finished runs given; returns the page."""
    runs = [_Run(p, load_run(runs_dir / p.run_id)) for p in planned]
    groups: dict[str, list[_Run]] = defaultdict(list)
    for r in runs:
        groups[r.group].append(r)
    axes = [k for k, _v in planned[0].assignment] if planned else []
    run_cols = ["run", *axes, "method", "learning_rate", "rounds", "final_top1", "best_top1", "final_perplexity",
                "mb_total", "mb_per_round", "epsilon", "divergences", "rounds_flagged", "end_reason"]
    tables: dict[str, tuple[Sequence[str], list[dict[str, Any]]]] = {
        "final_accuracy": (FINAL_COLUMNS, [_final_row(g, rs) for g, rs in groups.items()]),
        "runs": (run_cols, [r.row() for r in runs]),
        "bytes_per_round": (BYTES_COLUMNS, _bytes_rows(groups)),
        "divergence": (DIVERGENCE_COLUMNS, _divergence_rows(runs)),
    }
    for name, (cols, rows) in tables.items():
        write_csv(out / f"{name}.csv", cols, rows)
    plots = {"accuracy_vs_round": _plot_curves(groups, out / "accuracy_vs_round.png", by_mb=False),
             "accuracy_vs_mb": _plot_curves(groups, out / "accuracy_vs_mb.png", by_mb=True),
             "bytes_per_round": _plot_bytes(groups, out / "bytes_per_round.png")}
    if any(r.epsilon is not None for r in runs):
        plots["epsilon_vs_accuracy"] = _plot_epsilon(runs, out / "epsilon_vs_accuracy.png")
    page = out / "study_report.html"
    page.write_text(_render(study, runs, plots, tables), encoding="utf-8")
    return page


# --- tables -----------------------------------------------------------------------------------------------


def _final_row(group: str, runs: Sequence[_Run]) -> dict[str, Any]:
    finals = [f for f in (r.final_top1 for r in runs) if f is not None]
    rows = [r.row() for r in runs]
    return {
        "group": group, "method": runs[0].planned.method, "runs": len(runs),
        "seeds": " ".join(str(r.planned.config.common_args.random_seed) for r in runs),
        "top1_mean": statistics.fmean(finals) if finals else None,
        "top1_std": statistics.stdev(finals) if len(finals) > 1 else None,
        "top1_min": min(finals) if finals else None, "top1_max": max(finals) if finals else None,
        "best_top1_mean": _mean(x["best_top1"] for x in rows),
        "mb_total_mean": _mean(x["mb_total"] for x in rows),
        "mb_per_round_mean": _mean(x["mb_per_round"] for x in rows),
        "epsilon_mean": _mean(r.epsilon for r in runs),
        "divergent_runs": sum(bool(r.divergences) for r in runs),
    }


def _bytes_rows(groups: Mapping[str, Sequence[_Run]]) -> list[dict[str, Any]]:
    out = []
    for group, runs in groups.items():
        per_round: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            for row in r.rounds:
                per_round[row["round"]].append(row)
        for rnd in sorted(per_round, key=lambda x: _num(x) or 0.0):
            rows = per_round[rnd]
            up, down = _mean(_scaled(x["bytes_up"]) for x in rows), _mean(_scaled(x["bytes_down"]) for x in rows)
            out.append({"group": group, "round": rnd, "mb_up_mean": up, "mb_down_mean": down,
                        "mb_total_mean": None if up is None or down is None else up + down})
    return out


def _divergence_rows(runs: Sequence[_Run]) -> list[dict[str, Any]]:
    return [{"run": r.planned.run_id, "round": d.round, "device_id": d.device_id,
             "learning_rate": d.extra.get("learning_rate", r.planned.config.train_args.learning_rate),
             "metric": d.metric, "value": d.value, "threshold": d.threshold,
             "message": describe_divergence(d)}
            for r in runs for d in r.divergences]


# --- plots ------------------------------------------------------------------------------------------------


def _mean_curve(runs: Sequence[_Run], by_mb: bool) -> list[tuple[float, float, float, float]]:
    """(x, mean top-1 %, min, max) per round over the group's seeds (rounds every seed reached)."""
    per_round: dict[Any, list[tuple[float | None, float | None]]] = defaultdict(list)
    for r in runs:
        for row in r.rounds:
            per_round[row["round"]].append((_num(row["cum_mb"]), _num(row["top1"])))
    out = []
    for rnd in sorted(per_round, key=lambda x: _num(x) or 0.0):
        pts = per_round[rnd]
        xs = [x for x, _y in pts if x is not None] if by_mb else [_num(rnd)]
        ys = [100 * y for _x, y in pts if y is not None]
        if len(pts) == len(runs) and ys and xs and xs[0] is not None:
            out.append((statistics.fmean(x for x in xs if x is not None), statistics.fmean(ys), min(ys), max(ys)))
    return out


def _plot_curves(groups: Mapping[str, Sequence[_Run]], path: Path, by_mb: bool) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    xs_all: list[float] = []
    for i, (group, runs) in enumerate(groups.items()):
        curve = _mean_curve(runs, by_mb)
        if not curve:
            continue
        xs, mean, lo, hi = (list(c) for c in zip(*curve, strict=True))
        ax.plot(xs, mean, marker="o", ms=3, color=f"C{i % 10}", label=f"{group} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(xs, lo, hi, color=f"C{i % 10}", alpha=0.15)
        xs_all += xs
    ax.set_xlabel("cumulative traffic, up + down (MB, metered)" if by_mb else "round")
    positive = [x for x in xs_all if x > 0]
    if by_mb and positive and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
    ax.set_ylabel("server top-1 (%), mean over seeds; band = min..max")
    ax.set_title("Accuracy vs MB on the wire" if by_mb else "Accuracy vs round")
    ax.grid(alpha=0.3)
    if xs_all:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_bytes(groups: Mapping[str, Sequence[_Run]], path: Path) -> Path:
    names = list(groups)
    per = [_mean(r.row()["mb_per_round"] for r in groups[g]) or 0.0 for g in names]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.35 * len(names) + 1)))
    ax.barh(range(len(names)), per, color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    if per and min(p for p in per) > 0 and max(per) / min(per) > 50:
        ax.set_xscale("log")
    ax.set_xlabel("MB per round, up + down (metered), mean over seeds")
    ax.set_title("Bytes per round")
    return _save(fig, path)


def _plot_epsilon(runs: Sequence[_Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r.planned.method for r in runs})
    for i, method in enumerate(methods):
        dp = sorted((r.epsilon, 100 * r.final_top1) for r in runs
                    if r.planned.method == method and r.epsilon is not None and r.final_top1 is not None)
        if dp:
            ax.plot(*zip(*dp, strict=True), marker="o", ls="", color=f"C{i}", label=f"{method} (DP)")
        plain = [100 * r.final_top1 for r in runs
                 if r.planned.method == method and r.epsilon is None and r.final_top1 is not None]
        if plain:
            ax.axhline(statistics.fmean(plain), color=f"C{i}", ls="--", lw=1, label=f"{method}, no DP")
    ax.set_xlabel("epsilon spent at the end (largest over devices)")
    ax.set_ylabel("final server top-1 (%)")
    ax.set_title("Differential privacy: epsilon vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- html -------------------------------------------------------------------------------------------------


def _render(study: StudyConfig, runs: Sequence[_Run], plots: Mapping[str, Path],
            tables: Mapping[str, tuple[Sequence[str], list[dict[str, Any]]]]) -> str:
    kinds = sorted({str(r.summary.bytes_kind or "") for r in runs} - {""})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>study {html.escape(study.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Study {html.escape(study.name)}</h1><p>{html.escape(study.description)}</p>",
        f"<p>Base config <code>{html.escape(study.base_config)}</code>; {len(runs)} finished run(s). "
        "Groups are the grid values without the seed; figures are means over seeds with their spread. "
        f"MB = 10<sup>6</sup> bytes{'; bytes: ' + html.escape(', '.join(kinds)) if kinds else ''}.</p>",
    ]
    div_cols, div_rows = tables["divergence"]
    parts.append("<h2>Flagged runs (divergence)</h2>")
    parts.append(html_table(div_cols, div_rows) if div_rows else "<p>No run was flagged as diverging.</p>")
    for name in ("final_accuracy", "runs"):
        parts += [f"<h2>{name.replace('_', ' ').capitalize()}</h2>", html_table(*tables[name])]
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2><img alt='{name}' "
                     f"src='data:image/png;base64,{data}'>")
    parts += ["<h2>Bytes per round</h2>", html_table(*tables["bytes_per_round"]), "</body></html>"]
    return "\n".join(parts)


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "font-size:12px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "td.na{color:#999;font-style:italic}img{max-width:100%}")


def _last_epsilon(device_rounds: Sequence[DeviceRoundRecord], device: Any) -> float | None:
    eps = [_num(d.epsilon) for d in device_rounds if d.device_id == device]
    present = [e for e in eps if e is not None]
    return present[-1] if present else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _scaled(value: Any) -> float | None:
    v = _num(value)
    return None if v is None else v / MB


def _mean(values: Any) -> float | None:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return statistics.fmean(nums) if nums else None
