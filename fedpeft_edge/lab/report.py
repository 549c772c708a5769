"""The lab's network report: per-device round timelines, bytes over time per link, prediction vs measurement.

Every figure comes from what the run measured: metrics.jsonl's device_round records (bytes metered at the
wire; download_s measured at the device from the server's send time, upload_s at the server from the device's
send time; train_s at the device; response_s from the round's opening to the update's arrival) and the relays'
byte logs. The prediction is `fedpeft-edge profile --link`'s (planning.py) for the same model, method,
encoding and link rates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpeft_edge.config import LinkProfile, RunConfig  # noqa: E402
from fedpeft_edge.records import DeviceRoundRecord, RoundRecord  # noqa: E402
from fedpeft_edge.rundir import read_records  # noqa: E402

PHASE_COLORS = {"download": "tab:blue", "train": "tab:orange", "upload": "tab:green", "idle": "0.85"}


@dataclasses.dataclass(frozen=True)
class Segment:
    """One phase of one device's round, in seconds since the lab started."""

    device_id: str
    round: int
    phase: str  # download | train | upload | idle
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class LinkRow:
    """One device's accepted round on its link: measured bytes and times beside the ideal at the link's rate."""

    device_id: str
    link: str
    round: int
    bytes_down: int
    bytes_up: int
    download_s: float | None
    upload_s: float | None
    train_s: float | None
    response_s: float | None
    round_s: float | None
    ideal_down_s: float | None  # bytes over the shaped rate (None: direction unshaped)
    ideal_up_s: float | None
    relay_down_s: float | None = None  # the update's burst at the device's relay: arriving at the device
    relay_up_s: float | None = None  # ... and leaving the device (its sender side), 0.05 s resolution
    compute_s: float | None = None  # set_state + train + encode on the device (train_s alone if not recorded)

    @property
    def goodput_down_mbit(self) -> float | None:
        return _rate(self.bytes_down, self.download_s)

    @property
    def goodput_up_mbit(self) -> float | None:
        return _rate(self.bytes_up, self.upload_s)


def _rate(nbytes: int, seconds: float | None) -> float | None:
    return 8 * nbytes / seconds / 1e6 if seconds else None


def _ideal(nbytes: int, mbit: float | None) -> float | None:
    return 8 * nbytes / (mbit * 1e6) if mbit else None


def link_rows(run_dir: Path, links: dict[str, LinkProfile],
              relay_logs: dict[str, Path] | None = None) -> list[LinkRow]:
    """Every accepted device round of the run with its link's ideal transfer times (and the relay's, if given)."""
    rounds = {(r.round, r.attempt): r for r in read_records(run_dir, RoundRecord)}
    bins = {d: relay_bytes(p)[0] for d, p in (relay_logs or {}).items() if d in links}
    out = []
    for r in read_records(run_dir, DeviceRoundRecord):
        if r.status != "accepted" or r.device_id not in links or r.round is None:
            continue
        prof = links[r.device_id]
        rnd = rounds.get((r.round, r.attempt))
        opened = _opened(rnd)
        relay_down = relay_up = None
        if opened is not None and r.response_s and r.device_id in bins:
            # only this round's bins: back-to-back rounds would otherwise run into one burst
            mine = [b for b in bins[r.device_id] if opened - 0.05 <= b["t"] <= opened + r.response_s + 0.05]
            bursts = _bursts(mine, prof)
            relay_down = _largest(bursts, "down")
            relay_up = _largest(bursts, "up")
        down, up = int(r.bytes_down or 0), int(r.bytes_up or 0)
        out.append(LinkRow(r.device_id, prof.name, r.round, down, up, r.download_s, r.upload_s, r.train_s,
                           r.response_s, rnd.round_s if rnd else None, _ideal(down, prof.down_mbit),
                           _ideal(up, prof.up_mbit), relay_down, relay_up, _compute(r)))
    return out


def _opened(rnd: RoundRecord | None) -> float | None:
    """When a round opened: its record's time (written when it closed) less its duration."""
    if rnd is None or rnd.time is None or rnd.round_s is None:
        return None
    return rnd.time - rnd.round_s


def _compute(r: DeviceRoundRecord) -> float | None:
    parts = [r.set_state_s, r.train_s, r.encode_s]
    known = [float(x) for x in parts if isinstance(x, (int, float))]
    return sum(known) if known else None


@dataclasses.dataclass(frozen=True)
class Burst:
    """Consecutive relay bins carrying bytes one way: one transfer as the device's link saw it."""

    direction: str
    start: float
    end: float
    nbytes: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


def transfers(bins: Sequence[dict[str, Any]], gap_s: float = 0.2) -> list[Burst]:
    """Group a relay log's bins into bursts per direction (a pause longer than gap_s ends one). A burst spans
    the bins that carry its middle 96% of bytes, so a small message just before or after it does not stretch it."""
    out = []
    for direction in ("down", "up"):
        group: list[dict[str, Any]] = []
        for b in sorted((b for b in bins if b.get(direction)), key=lambda b: b["t"]):
            if group and b["t"] - group[-1]["t"] > gap_s:
                out.append(_burst(group, direction))
                group = []
            group.append(b)
        if group:
            out.append(_burst(group, direction))
    return out


def _burst(group: Sequence[dict[str, Any]], direction: str) -> Burst:
    from fedpeft_edge.lab.relay import BIN_S

    total = sum(int(b[direction]) for b in group)
    seen, first, last = 0, None, group[-1]["t"]
    for b in group:
        seen += int(b[direction])
        if first is None and seen > 0.02 * total:
            first = b["t"]
        if seen >= 0.98 * total:
            last = b["t"]
            break
    start = group[0]["t"] if first is None else first
    return Burst(direction, start, last + BIN_S, total)


def _bursts(bins: Sequence[dict[str, Any]], prof: LinkProfile) -> list[Burst]:
    """Bursts per direction; a pause ends one only if longer than the kernel's send buffer takes to drain twice
    at the link's rate (at 1 Mbit/s the relay's writes arrive in 64 kB steps half a second apart)."""
    out = []
    for direction, mbit in (("down", prof.down_mbit), ("up", prof.up_mbit)):
        gap = max(0.3, 2 * 65536 * 8 / (mbit * 1e6)) if mbit else 0.3
        out += [b for b in transfers(bins, gap) if b.direction == direction]
    return out


def _largest(bursts: Sequence[Burst], direction: str) -> float | None:
    mine = [b for b in bursts if b.direction == direction]
    return max(mine, key=lambda b: b.nbytes).seconds if mine else None


def timeline(run_dir: Path, origin: float) -> list[Segment]:
    """Download, train, upload and idle per device and round, from the device_round and round records."""
    rounds = {(r.round, r.attempt): r for r in read_records(run_dir, RoundRecord)}
    segs: list[Segment] = []
    for r in read_records(run_dir, DeviceRoundRecord):
        rnd = rounds.get((r.round, r.attempt))
        start = _opened(rnd)
        if r.status != "accepted" or rnd is None or rnd.time is None or start is None or not r.response_s:
            continue
        opened = start - origin
        closed = rnd.time - origin
        arrived = opened + r.response_s
        down_end = opened + (r.download_s or 0.0)
        up_start = arrived - (r.upload_s or 0.0)
        train_end = min(up_start, down_end + (_compute(r) or 0.0))
        d, n = str(r.device_id), int(r.round or 0)
        segs += [Segment(d, n, "download", opened, down_end), Segment(d, n, "train", down_end, train_end),
                 Segment(d, n, "idle", train_end, up_start), Segment(d, n, "upload", up_start, arrived),
                 Segment(d, n, "idle", arrived, closed)]
    return [s for s in segs if s.end > s.start]


def relay_bytes(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A relay log's byte bins and its events (cut, restore)."""
    bins: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            (events if "event" in rec else bins).append(rec)
    return bins, events


@dataclasses.dataclass(frozen=True)
class PredictionRow:
    """The profile's predicted transfer seconds (down + up) for one method on one link, beside the lab's."""

    method: str
    link: str
    update_bytes: int
    predicted_s: float
    measured_s: float  # median over the devices' accepted rounds on that link of download_s + upload_s
    predicted_round_s: float  # predicted transfer + the measured median compute (set_state + train + encode)
    measured_round_s: float  # median response_s (round opened -> update arrived)

    @property
    def ratio(self) -> float:
        return self.measured_s / self.predicted_s if self.predicted_s else float("nan")

    @property
    def round_ratio(self) -> float:
        return self.measured_round_s / self.predicted_round_s if self.predicted_round_s else float("nan")


def predictions(cfg: RunConfig, rows: Sequence[LinkRow], links: dict[str, LinkProfile]) -> list[PredictionRow]:
    """The planning module's round_seconds for this job on each shaped link, beside the median measured."""
    from fedpeft_edge.planning import measure_update, round_seconds

    size = measure_update(cfg.model_args, cfg.peft_args.method, cfg.comm_args, cfg.peft_args)
    out = []
    for name in sorted({p.name for p in links.values()}):
        prof = next(p for p in links.values() if p.name == name)
        mine = [r for r in rows if r.link == name and r.download_s is not None and r.upload_s is not None]
        if not (prof.down_mbit and prof.up_mbit) or not mine:
            continue
        pred = round_seconds(size, prof.down_mbit * 1e6, prof.up_mbit * 1e6)
        train = statistics.median(r.compute_s or 0.0 for r in mine)
        out.append(PredictionRow(cfg.peft_args.method, name, size.mqtt_bytes, pred,
                                 statistics.median((r.download_s or 0.0) + (r.upload_s or 0.0) for r in mine),
                                 pred + train, statistics.median(r.response_s or 0.0 for r in mine)))
    return out


def format_predictions(rows: Sequence[PredictionRow]) -> str:
    head = (f"{'method':<8}{'link':<12}{'update MB':>10}{'pred s':>9}{'meas s':>9}{'meas/pred':>10}"
            f"{'pred round':>11}{'meas round':>11}{'ratio':>7}")
    lines = ["transfer = download + upload of one update (profile --link prediction vs lab measurement)", head,
             "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:<8}{r.link:<12}{r.update_bytes / 1e6:>10.3f}{r.predicted_s:>9.3f}"
                     f"{r.measured_s:>9.3f}{r.ratio:>10.3f}{r.predicted_round_s:>11.3f}{r.measured_round_s:>11.3f}"
                     f"{r.round_ratio:>7.3f}")
    return "\n".join(lines)


def plot_timeline(segs: Sequence[Segment], links: dict[str, LinkProfile], path: Path,
                  outages: Sequence[dict[str, Any]] = (), origin: float = 0.0) -> Path:
    """Gantt-style chart: one row per device, one bar per phase of each round."""
    devices = sorted(links, key=lambda d: int(d[1:]) if d[1:].isdigit() else 0)
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.6 * len(devices)))
    for y, d in enumerate(devices):
        for phase, color in PHASE_COLORS.items():
            bars = [(s.start, s.end - s.start) for s in segs if s.device_id == d and s.phase == phase]
            if bars:
                ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=color, label=phase if y == 0 else None)
    for o in outages:
        if o["device"] in devices:
            row = devices.index(o["device"])
            ax.broken_barh([(o["started"] - origin, o["duration_s"])], (row - 0.45, 0.9), facecolors="none",
                           edgecolors="red", hatch="//", label="link cut")
    ax.set_yticks(range(len(devices)), [f"{d} ({links[d].name})" for d in devices])
    ax.set_xlabel("seconds since the lab started")
    ax.set_title("per-device round timeline")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    ax.legend(uniq.values(), uniq.keys(), loc="upper right", fontsize=8, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bytes(relay_logs: dict[str, Path], links: dict[str, LinkProfile], path: Path, origin: float) -> Path:
    """Cumulative bytes each device's link carried, down and up, over time; colour per link profile."""
    names = sorted({p.name for p in links.values()})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for d, log_path in sorted(relay_logs.items()):
        bins, _ = relay_bytes(log_path)
        for ax, direction in zip(axes, ("down", "up"), strict=True):
            t, total = [], 0
            ys = []
            for b in bins:
                total += int(b.get(direction, 0))
                t.append(b["t"] - origin)
                ys.append(total / 1e6)
            if t:
                ax.step(t, ys, where="post", color=colors[links[d].name], label=f"{d} ({links[d].name})")
    for ax, direction in zip(axes, ("down (server -> device)", "up (device -> server)"), strict=True):
        ax.set_title(f"bytes over time, {direction}")
        ax.set_xlabel("seconds since the lab started")
        ax.set_ylabel("MB (cumulative, at the relay)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclasses.dataclass(frozen=True)
class LabReport:
    table: str
    files: list[Path]
    rows: list[LinkRow]
    predictions: list[PredictionRow]


def format_links(rows: Sequence[LinkRow]) -> str:
    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    head = (f"{'dev':<5}{'link':<13}{'rnd':>4}{'down MB':>9}{'down s':>9}{'relay':>9}{'ideal':>9}{'Mbit/s':>8}"
            f"{'up MB':>8}{'up s':>9}{'relay':>9}{'ideal':>9}{'Mbit/s':>8}{'comp s':>8}{'resp s':>9}")
    lines = ["down s: server send -> last byte at the device (receiver); up s: device send -> last byte at the "
             "server (receiver); relay: the burst on the device's link (down: arriving, up: leaving = sender); "
             "comp s: set_state + train + encode on the device. Relay times resolve 0.05 s and mean little for "
             "transfers under ~64 kB (the kernel takes those at once)",
             head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.device_id:<5}{r.link:<13}{r.round:>4}{r.bytes_down / 1e6:>9.3f}{f(r.download_s):>9}"
                     f"{f(r.relay_down_s, '.2f'):>9}{f(r.ideal_down_s):>9}{f(r.goodput_down_mbit, '.2f'):>8}"
                     f"{r.bytes_up / 1e6:>8.3f}{f(r.upload_s):>9}{f(r.relay_up_s, '.2f'):>9}{f(r.ideal_up_s):>9}"
                     f"{f(r.goodput_up_mbit, '.2f'):>8}{f(r.compute_s):>8}{f(r.response_s):>9}")
    return "\n".join(lines)


def write_lab_report(result: Any, cfg: RunConfig, out_dir: Path | None = None) -> LabReport:
    """Write lab_timeline.png, lab_bytes.png, lab_links.csv, lab_prediction.csv and lab_report.txt."""
    out = out_dir or result.run_dir
    rows = link_rows(result.run_dir, result.links, result.relay_logs)
    preds = predictions(cfg, rows, result.links)
    files = [plot_timeline(timeline(result.run_dir, result.started_at), result.links, out / "lab_timeline.png",
                           result.outages, result.started_at),
             plot_bytes(result.relay_logs, result.links, out / "lab_bytes.png", result.started_at)]
    links_csv = out / "lab_links.csv"
    with links_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*(f.name for f in dataclasses.fields(LinkRow)), "goodput_down_mbit", "goodput_up_mbit"])
        for r in rows:
            w.writerow([*dataclasses.astuple(r), r.goodput_down_mbit, r.goodput_up_mbit])
    pred_csv = out / "lab_prediction.csv"
    with pred_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*(f.name for f in dataclasses.fields(PredictionRow)), "ratio", "round_ratio"])
        for p in preds:
            w.writerow([*dataclasses.astuple(p), p.ratio, p.round_ratio])
    table = format_links(rows) + "\n\n" + format_predictions(preds)
    txt = out / "lab_report.txt"
    txt.write_text(table + "\n")
    return LabReport(table, [*files, links_csv, pred_csv, txt], rows, preds)
