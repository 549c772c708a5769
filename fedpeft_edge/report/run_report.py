"""Reports from run directories: report.html (self-contained), PNG plots and one CSV per table.

Reads only what the server wrote (`config.yaml`, `metrics.jsonl`, `summary.json`; docs/design.md "Run
directory"). Figures are measured values; a value a device could not measure is printed "not available".
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpeft_edge.config import RunConfig, load_config  # noqa: E402
from fedpeft_edge.errors import CheckpointError, ConfigError  # noqa: E402
from fedpeft_edge.metering.energy import ENERGY_COLUMNS, energy_rows  # noqa: E402
from fedpeft_edge.protocol.report import DeviceReport  # noqa: E402
from fedpeft_edge.records import (  # noqa: E402
    AssignmentRecord,
    DeviceRoundRecord,
    DivergenceRecord,
    JoinRecord,
    RoundRecord,
    RunSummary,
)
from fedpeft_edge.rundir import describe_divergence, read_metrics, read_records, read_summary  # noqa: E402

log = logging.getLogger(__name__)

NOT_AVAILABLE = "not available"
MB = 1e6  # report sizes in decimal megabytes (10^6 bytes), as network figures usually are

ROUND_COLUMNS = ("run", "method", "round", "top1", "loss", "perplexity", "eval_samples", "bytes_up", "bytes_down",
                 "cum_bytes", "cum_mb", "round_s", "aggregate_s", "selected", "accepted", "dropped",
                 "devices_online")
DEVICE_ROUND_COLUMNS = ("run", "round", "device_id", "status", "drop_reason", "num_samples", "bytes_up",
                        "bytes_down", "mb_up", "mb_down", "download_s", "train_s", "upload_s", "wait_s",
                        "train_loss", "train_acc", "epsilon", "wall_s", "cpu_s", "cpu_util_pct",
                        "rss_mean_mb", "rss_peak_mb", "gpu_mem_peak_allocated_mb", "gpu_mem_peak_reserved_mb",
                        "energy_j", "energy_source", "power_mean_w", "net_bytes_sent", "net_bytes_recv",
                        "net_loopback_bytes", "rank")
DEVICE_COLUMNS = ("run", "device_id", "accepted", "reason", "hostname", "device_model", "cpu_model",
                  "ram_total_mb", "accelerator", "l4t_version", "num_train", "num_test", "rounds_accepted",
                  "bytes_up_total", "bytes_down_total", "rss_peak_mb", "gpu_mem_peak_reserved_mb",
                  "energy_j_total", "energy_rounds", "epsilon_last", "rank", "rank_reason")
DIVERGENCE_COLUMNS = ("run", "round", "device_id", "learning_rate", "metric", "value", "threshold", "flag")
_PROFILE_KEYS = ("hostname", "device_model", "cpu_model", "ram_total_mb", "accelerator", "l4t_version")
_RESOURCE_KEYS = ("wall_s", "cpu_s", "cpu_util_pct", "rss_mean_mb", "rss_peak_mb",
                  "gpu_mem_peak_allocated_mb", "gpu_mem_peak_reserved_mb", "energy_j", "energy_source",
                  "power_mean_w", "net_bytes_sent", "net_bytes_recv", "net_loopback_bytes")


@dataclasses.dataclass(frozen=True)
class RunData:
    """One run directory, parsed."""

    name: str
    path: Path
    method: str | None
    config: RunConfig | None
    joins: list[JoinRecord]
    device_rounds: list[DeviceRoundRecord]
    rounds: list[RoundRecord]
    summary: RunSummary | None  # None: the run has no (readable) summary.json
    assignments: list[AssignmentRecord] = dataclasses.field(default_factory=list)  # LoRA ranks given (flexlora)

    @property
    def label(self) -> str:
        return f"{self.method} ({self.name})" if self.method else self.name


@dataclasses.dataclass(frozen=True)
class ReportFiles:
    """What write_report wrote."""

    html: Path
    plots: dict[str, Path]
    csvs: dict[str, Path]


# --- reading ------------------------------------------------------------------------------------------------


def load_run(path: str | Path) -> RunData:
    """Parse a run directory; CheckpointError if it has no metrics.jsonl."""
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CheckpointError(
            f"{run_dir} has no metrics.jsonl; pass a run directory written by fedpeft-server"
        )
    records = read_metrics(run_dir)
    cfg = _read_config(run_dir / "config.yaml")
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_kind[str(rec.get("kind"))].append(rec)
    return RunData(
        name=run_dir.resolve().name, path=run_dir, method=cfg.peft_args.method if cfg else None, config=cfg,
        joins=[JoinRecord.from_dict(r) for r in by_kind[JoinRecord.KIND]],
        device_rounds=sorted((DeviceRoundRecord.from_dict(r) for r in by_kind[DeviceRoundRecord.KIND]),
                             key=_round_device_key),
        rounds=sorted((RoundRecord.from_dict(r) for r in by_kind[RoundRecord.KIND]),
                      key=lambda r: _num(r.round) or 0.0),
        summary=read_summary(run_dir),
        assignments=[AssignmentRecord.from_dict(r) for r in by_kind[AssignmentRecord.KIND]],
    )


def _read_config(path: Path) -> RunConfig | None:
    if not path.is_file():
        log.warning("%s is missing; runs are labelled by directory name", path)
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        log.warning("cannot read %s (%s); runs are labelled by directory name", path, exc)
        return None


def _round_device_key(rec: DeviceRoundRecord) -> tuple[float, str]:
    return (_num(rec.round) or 0.0, str(rec.device_id))


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _count(value: Any) -> Any:
    """`selected` / `accepted` / `dropped` may be lists, counters or counts: report a count."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(v for v in value.values() if isinstance(v, (int, float)))
    return value


# --- tables -------------------------------------------------------------------------------------------------


CATEGORY_COLUMNS = ("run", "round", "category", "perplexity", "loss", "next_token_acc", "tokens")


def category_rows(run: RunData) -> list[dict[str, Any]]:
    """A causal LM's held-out perplexity and next-token accuracy per category and round (none otherwise)."""
    rows = []
    for r in run.rounds:
        for name, ev in ((r.eval or {}).get("per_category") or {}).items():
            rows.append({"run": run.name, "round": r.round, "category": name,
                         "perplexity": ev.get("perplexity"), "loss": ev.get("loss"),
                         "next_token_acc": ev.get("top1"), "tokens": ev.get("samples")})
    return rows


def answer_rows(run: RunData) -> list[dict[str, Any]]:
    """The held-out prompts a demo had the base and the federated model continue (llm_samples.json)."""
    path = run.path / "llm_samples.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return []
    return [{"run": run.name, **r} for r in rows if isinstance(r, dict)]


def round_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per server round."""
    rows = []
    for r in run.rounds:
        ev = r.eval or {}
        rows.append({
            "run": run.name, "method": run.method, "round": r.round, "top1": ev.get("top1"),
            "loss": ev.get("loss"), "perplexity": ev.get("perplexity"), "eval_samples": ev.get("samples"),
            "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "cum_bytes": r.cum_bytes,
            "cum_mb": _scaled(r.cum_bytes), "round_s": r.round_s,
            "aggregate_s": r.aggregate_s, "selected": _count(r.selected),
            "accepted": _count(r.accepted), "dropped": _count(r.dropped),
            "devices_online": _count(r.devices_online),
        })
    return rows


def device_round_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per device per round, with its resource summary and its time spent waiting."""
    round_s = {r.round: _num(r.round_s) for r in run.rounds}
    rows = []
    for d in run.device_rounds:
        rec = d.to_dict()
        rep = DeviceReport.from_record(rec)  # what the device measured, as the typed report the agent sent
        res = dict(rep.resources or {})
        row = {k: rec.get(k) for k in DEVICE_ROUND_COLUMNS if k in rec}
        row.update(train_s=rep.train_s, train_loss=rep.train_loss, train_acc=rep.train_acc, epsilon=rep.epsilon,
                   download_s=rep.download_s)
        row.update(run=run.name, mb_up=_scaled(d.bytes_up), mb_down=_scaled(d.bytes_down),
                   wait_s=_wait_s(d, round_s.get(d.round)))
        row.update({k: res.get(k) for k in _RESOURCE_KEYS})
        rows.append({k: row.get(k) for k in DEVICE_ROUND_COLUMNS})
    return rows


def _scaled(value: Any) -> float | None:
    v = _num(value)
    return None if v is None else v / MB


def _wait_s(rec: DeviceRoundRecord, round_s: float | None) -> float | None:
    parts = [_num(rec.download_s), _num(rec.train_s), _num(rec.upload_s)]
    if round_s is None or rec.status != "accepted" or any(p is None for p in parts):
        return None
    return max(round_s - sum(p for p in parts if p is not None), 0.0)


def divergence_rows(run: RunData) -> list[dict[str, Any]]:
    """The run's `divergence` records (a device training above chance loss, a global model at chance)."""
    lr = run.config.train_args.learning_rate if run.config else None
    return [{"run": run.name, "round": d.round, "device_id": d.device_id,
             "learning_rate": d.extra.get("learning_rate", lr), "metric": d.metric, "value": d.value,
             "threshold": d.threshold, "flag": describe_divergence(d)}
            for d in read_records(run.path, DivergenceRecord)]


def device_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per device that joined: its profile, data and per-run totals and peaks."""
    per_dev: dict[str, list[DeviceRoundRecord]] = defaultdict(list)
    for d in run.device_rounds:
        per_dev[str(d.device_id)].append(d)
    latest = {str(j.device_id): j for j in run.joins}  # a device that re-joined: its last join
    ranks = {str(a.device_id): a for a in run.assignments}
    rows = []
    for dev, j in latest.items():
        prof, stats = j.profile or {}, j.data_stats or {}
        row: dict[str, Any] = {
            "run": run.name, "device_id": dev, "accepted": j.accepted, "reason": j.reason,
            **{k: prof.get(k) for k in _PROFILE_KEYS},
            "num_train": stats.get("num_train"), "num_test": stats.get("num_test"),
        }
        row.update(_device_totals(per_dev.get(dev, [])))
        given = ranks.get(dev)  # the last rank the server gave it, and why
        row.update(rank=given.rank if given else None, rank_reason=given.reason if given else None)
        rows.append(row)
    return rows


def _device_totals(recs: Sequence[DeviceRoundRecord]) -> dict[str, Any]:
    ok = [r for r in recs if r.status == "accepted"]
    res = [r.resources or {} for r in recs]
    energy = [_num(x.get("energy_j")) for x in res]
    eps = [e for r in recs if (e := _num(r.epsilon)) is not None]
    return {
        "rounds_accepted": len(ok),
        "bytes_up_total": _sum_or_none(r.bytes_up for r in recs),
        "bytes_down_total": _sum_or_none(r.bytes_down for r in recs),
        "rss_peak_mb": _max_or_none(x.get("rss_peak_mb") for x in res),
        "gpu_mem_peak_reserved_mb": _max_or_none(x.get("gpu_mem_peak_reserved_mb") for x in res),
        "energy_j_total": _sum_or_none(energy), "energy_rounds": sum(e is not None for e in energy),
        "epsilon_last": eps[-1] if eps else None,
    }


def _present(values: Iterable[Any]) -> list[int | float]:
    """The numbers among values, as given (ints stay ints, so byte counts print exactly)."""
    return [v for v in values if _num(v) is not None]


def _sum_or_none(values: Iterable[Any]) -> int | float | None:
    nums = _present(values)
    return sum(nums) if nums else None


def _max_or_none(values: Iterable[Any]) -> int | float | None:
    nums = _present(values)
    return max(nums) if nums else None


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows; None becomes an empty cell, floats keep full precision."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return path


# --- plots --------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: {NOT_AVAILABLE}", ha="center", va="center", transform=ax.transAxes,
            color="0.4")


def plot_accuracy(runs: Sequence[RunData], path: Path, by_bytes: bool) -> Path:
    """Server-side top-1 accuracy per round, or against cumulative MB on the wire (one curve per run)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs: list[float] = []
    for run in runs:
        raw = [(_num(r["cum_mb"] if by_bytes else r["round"]), _num(r["top1"])) for r in round_rows(run)]
        pts = [(x, 100.0 * y) for x, y in raw if x is not None and y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=run.label)
            xs += [x for x, _y in pts]
    if by_bytes:
        ax.set_xlabel("cumulative MQTT traffic, up + down (MB, measured)")
        ax.set_title("Accuracy vs data on the wire")
        positive = [x for x in xs if x > 0]
        if positive and max(positive) / min(positive) > 50:  # methods differ by orders of magnitude
            ax.set_xscale("log")
    else:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Accuracy vs round")
    ax.set_ylabel("server test top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if xs:
        ax.legend()
    else:
        _no_data(ax, "accuracy")
    return _save(fig, path)


def _per_run_axes(runs: Sequence[RunData], height: float = 3.2) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, height * len(runs)), squeeze=False)
    return fig, [a for row in axes for a in row]


def plot_bytes_per_device(runs: Sequence[RunData], path: Path) -> Path:
    """MB up (left) and down (right) per device per round, one row of panels per run."""
    fig, grid = plt.subplots(len(runs), 2, figsize=(11, 3.2 * len(runs)), squeeze=False)
    for run, axes in zip(runs, grid, strict=True):
        rows = device_round_rows(run)
        devices = sorted({str(r["device_id"]) for r in rows})
        for ax, key, direction in ((axes[0], "mb_up", "up (device to server)"),
                                   (axes[1], "mb_down", "down (server to device)")):
            top = 0.0
            for dev in devices:
                pts = [(r["round"], r[key]) for r in rows if str(r["device_id"]) == dev and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=dev)
                    top = max([top] + [y for _x, y in pts])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{run.label}: MB {direction}", fontsize=10)
            ax.set_xlabel("round")
            ax.set_ylabel("MB per round (measured)")
            ax.set_ylim(0, top * 1.15 or 1.0)
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=7)
            else:
                _no_data(ax, "per-device bytes")
    return _save(fig, path)


def plot_round_time(runs: Sequence[RunData], path: Path) -> Path:
    """Mean over accepted devices of download, training, upload and waiting time, stacked per round."""
    fig, axes = _per_run_axes(runs)
    phases = ("download_s", "train_s", "upload_s", "wait_s")
    for run, ax in zip(runs, axes, strict=True):
        split = _round_time_split(run)
        rounds = sorted(split)
        bottom = [0.0] * len(rounds)
        for phase in phases:
            vals = [split[r][phase] for r in rounds]
            ax.bar(rounds, vals, bottom=bottom, label=phase[:-2])
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"Round time split (mean over accepted devices): {run.label}")
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
        if rounds:
            ax.legend(fontsize=8)
        else:
            _no_data(ax, "round times")
    return _save(fig, path)


def _round_time_split(run: RunData) -> dict[Any, dict[str, float]]:
    acc: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in device_round_rows(run):
        if row["wait_s"] is not None:
            acc[row["round"]].append(row)
    phases = ("download_s", "train_s", "upload_s", "wait_s")
    return {rnd: {k: sum(r[k] for r in rows) / len(rows) for k in phases} for rnd, rows in acc.items()}


def plot_device_resources(runs: Sequence[RunData], path: Path) -> Path:
    """Peak RSS, peak GPU memory and energy per round per device; absent sensors say "not available"."""
    panels: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float | None]], ...] = (
        ("peak RSS (MB)", "peak process RSS", lambda r: _num(r["rss_peak_mb"])),
        ("peak GPU reserved (MB)", "peak GPU memory", lambda r: _num(r["gpu_mem_peak_reserved_mb"])),
        ("energy per round (J)", "energy", _energy_per_round),
    )
    rows = [r for run in runs for r in device_rows(run)]
    colors = {run.name: f"C{i}" for i, run in enumerate(runs)}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, (ylabel, title, value) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        vals = [value(r) for r in rows]
        if all(v is None for v in vals):
            ax.set_xticks([])
            ax.set_yticks([])
            _no_data(ax, title)
            continue
        ax.bar(range(len(rows)), [v or 0.0 for v in vals], color=[colors[r["run"]] for r in rows])
        for i, v in enumerate(vals):
            if v is None:
                ax.text(i, 0, NOT_AVAILABLE, rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        labels = [f"{r['device_id']}\n{r['run']}" for r in rows]
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=6)
    return _save(fig, path)


def _energy_per_round(row: Mapping[str, Any]) -> float | None:
    total, n = _num(row["energy_j_total"]), row["energy_rounds"]
    return total / n if total is not None and n else None


def plot_epsilon(runs: Sequence[RunData], path: Path) -> Path | None:
    """Privacy spent (epsilon) per device per round, for DP runs; None if no run has epsilons."""
    pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        for r in device_round_rows(run):
            eps, rnd = _num(r["epsilon"]), _num(r["round"])
            if eps is not None and rnd is not None:
                pts[f"{r['device_id']} ({run.name})"].append((rnd, eps))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, series in sorted(pts.items()):
        ax.plot(*zip(*series, strict=True), marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Differential privacy: epsilon per device")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --- HTML ---------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None or value == "":
        return f'<td class="na">{NOT_AVAILABLE}</td>'
    if isinstance(value, float):
        return f"<td>{value:.4g}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def html_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def _run_overview(run: RunData) -> dict[str, Any]:
    cfg = run.config
    return {
        "run": run.name, "method": run.method, "model": cfg.model_args.model if cfg else None,
        "dataset": cfg.data_args.dataset if cfg else None,
        "encoding": cfg.comm_args.encoding if cfg else None, "rounds": len(run.rounds),
        "devices joined": len({j.device_id for j in run.joins}),
    }


def _summary_rows(runs: Sequence[RunData]) -> tuple[list[str], list[dict[str, Any]]]:
    """summary.json side by side: one row per scalar key, one column per run."""
    keys: dict[str, None] = {}
    summaries = {run.name: run.summary.to_dict() if run.summary else {} for run in runs}
    for summary in summaries.values():
        keys.update({k: None for k, v in summary.items() if isinstance(v, (str, int, float, bool))})
    rows = [{"key": k, **{name: summary.get(k) for name, summary in summaries.items()}} for k in keys]
    return ["key"] + [run.name for run in runs], rows


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "font-size:12px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "td.na{color:#999;font-style:italic}img{max-width:100%}")


def render_html(runs: Sequence[RunData], plots: Mapping[str, Path], tables: Mapping[str, tuple[Sequence[str],
                list[dict[str, Any]]]]) -> str:
    overview = [_run_overview(r) for r in runs]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fedpeft-edge report</title>"
             f"<style>{_CSS}</style></head><body><h1>fedpeft-edge report</h1>",
             "<p>All figures were measured on the devices and at the MQTT layer; a sensor a device does not "
             f"have is shown as <em>{NOT_AVAILABLE}</em>. MB = 10<sup>6</sup> bytes.</p>",
             "<h2>Runs</h2>", html_table(list(overview[0]) if overview else [], overview),
             "<h2>Run summaries (summary.json)</h2>", html_table(*_summary_rows(runs))]
    for name, path in plots.items():
        parts += [f"<h2>{html.escape(name.replace('_', ' '))}</h2>", _img(path)]
    for name, (columns, rows) in tables.items():
        parts += [f"<h2>Table: {html.escape(name.replace('_', ' '))}</h2>", html_table(columns, rows)]
    parts.append("</body></html>")
    return "\n".join(parts)


# --- entry point --------------------------------------------------------------------------------------------


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """RUN_DIR/report for one run; beside the runs, report-<a>-vs-<b>, for several."""
    paths = [Path(p) for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / "report"
    return paths[0].resolve().parent / ("report-" + "-vs-".join(p.resolve().name for p in paths))


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> ReportFiles:
    """Read the runs and write report.html, the PNGs and the CSVs into out_dir."""
    if not run_dirs:
        raise CheckpointError("no run directory given; pass at least one runs/<run_id> directory")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "rounds": (ROUND_COLUMNS, [r for run in runs for r in round_rows(run)]),
        "devices": (DEVICE_COLUMNS, [r for run in runs for r in device_rows(run)]),
        "device_rounds": (DEVICE_ROUND_COLUMNS, [r for run in runs for r in device_round_rows(run)]),
        "energy": (ENERGY_COLUMNS, [r for run in runs
                                    for r in energy_rows([d.to_dict() for d in run.device_rounds], run.name)]),
        "divergence": (DIVERGENCE_COLUMNS, [r for run in runs for r in divergence_rows(run)]),
    }
    categories = [r for run in runs for r in category_rows(run)]
    if categories:  # a causal LM: held-out perplexity per category, and prompts answered before/after
        tables["perplexity_by_category"] = (CATEGORY_COLUMNS, categories)
        answers = [r for run in runs for r in answer_rows(run)]
        if answers:
            tables["held_out_prompts"] = (tuple(answers[0]), answers)
    csvs = {name: write_csv(out / f"{name}.csv", cols, rows) for name, (cols, rows) in tables.items()}
    plots = _write_plots(runs, out)
    page = out / "report.html"
    page.write_text(render_html(runs, plots, tables), encoding="utf-8")
    log.info("report for %d run(s) written to %s", len(runs), out)
    return ReportFiles(html=page, plots=plots, csvs=csvs)


def _write_plots(runs: Sequence[RunData], out: Path) -> dict[str, Path]:
    plots = {
        "accuracy_vs_round": plot_accuracy(runs, out / "accuracy_vs_round.png", by_bytes=False),
        "accuracy_vs_mb": plot_accuracy(runs, out / "accuracy_vs_mb.png", by_bytes=True),
        "bytes_per_device": plot_bytes_per_device(runs, out / "bytes_per_device.png"),
        "round_time": plot_round_time(runs, out / "round_time.png"),
        "device_resources": plot_device_resources(runs, out / "device_resources.png"),
    }
    eps = plot_epsilon(runs, out / "epsilon.png")
    if eps is not None:
        plots["epsilon"] = eps
    return plots
