"""One run's federation as the dashboard shows it, folded from run-log records; each record yields a delta."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fedpeft_edge.records import (
    AssignmentRecord,
    DeviceErrorRecord,
    DeviceRoundRecord,
    DeviceStatusRecord,
    DroppedMessage,
    JoinRecord,
    PresenceRecord,
    Record,
    ResumeRecord,
    RoundOpenRecord,
    RoundRecord,
    parse_record,
)

MB = 1e6

class FederationState:
    """Devices, rounds and the round in progress of one run, built only from metrics.jsonl records.

    `apply(record)` folds a record in and returns the delta (the parts of the snapshot it changed, same
    shape), so a browser holding a snapshot stays current by merging deltas; `snapshot()` is the whole view.
    Thread-safe: the run log's sink thread applies, the web server's loop reads.
    """

    def __init__(self, run_id: str, run_dir: str, info: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self.seq = 0
        self.run: dict[str, Any] = {"run_id": run_id, "run_dir": run_dir, "finished": False,
                                    "started": None, "last_record": None, **(info or {})}
        self.devices: dict[str, dict[str, Any]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.dropped_messages: dict[str, int] = {}

    # --- reading --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"seq": self.seq, "server_time": time.time(), "run": dict(self.run),
                    "devices": {k: dict(v) for k, v in self.devices.items()}, "rounds": list(self.rounds),
                    "current": dict(self.current) if self.current else None,
                    "dropped_messages": dict(self.dropped_messages)}

    # --- folding --------------------------------------------------------------------------------------
    def apply(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Fold one record in; the delta it caused (None if it changed nothing shown)."""
        typed = parse_record(record)
        handler = _HANDLERS.get(type(typed)) if typed is not None else None
        if handler is None:
            return None
        with self._lock:
            delta = handler(self, typed)
            if delta is None:
                return None
            t = record.get("time")
            self.run["last_record"] = t
            if self.run["started"] is None:
                self.run["started"] = t
            self.seq += 1
            delta["seq"] = self.seq
            delta.setdefault("run", {})["last_record"] = t
            delta["run"]["started"] = self.run["started"]
            return delta

    def mark_finished(self, summary: dict[str, Any] | None) -> dict[str, Any]:
        """The run ended: no round is open and no device is online in it any more (whatever their last
        presence said: a device's agent stops at FINISH, and a finished run has nobody left to train)."""
        with self._lock:
            self.run["finished"] = True
            self.run["summary"] = summary
            self.current = None
            for dev in self.devices.values():
                dev["online"] = False
            self.seq += 1
            return {"seq": self.seq, "run": {"finished": True, "summary": summary}, "current": None,
                    "devices": {k: dict(v) for k, v in self.devices.items()}}

    def _device(self, device_id: str) -> dict[str, Any]:
        dev = self.devices.get(device_id)
        if dev is None:
            dev = {"device_id": device_id, "accepted": None, "online": None, "last_seen": None, "profile": None,
                   "num_samples": None, "last_round": None, "last_status": None, "drop_reason": None,
                   "cpu_s": None, "cpu_util_pct": None, "rss_peak_mb": None, "energy_j": None, "epsilon": None,
                   "train_loss": None, "train_acc": None, "bytes_down": 0, "bytes_up": 0, "rounds_accepted": 0,
                   "drops": {}, "error": None}
            self.devices[device_id] = dev
        return dev

    def _touch(self, device_id: str | None, t: float | None) -> dict[str, Any] | None:
        if not device_id:
            return None
        dev = self._device(str(device_id))
        dev["last_seen"] = t
        return dev

    def _on_join(self, r: JoinRecord) -> dict[str, Any] | None:
        dev = self._touch(r.device_id, r.time)
        if dev is None:
            return None
        dev.update(accepted=bool(r.accepted), online=True, reason=r.reason,
                   profile=_profile_line(r.profile), num_samples=r.num_samples, client_idx=r.client_idx)
        return {"devices": {dev["device_id"]: dict(dev)}}

    def _on_assignment(self, r: AssignmentRecord) -> dict[str, Any] | None:
        """What the server's shape plan gave a device (LoRA flexlora: its rank and why)."""
        dev = self._touch(r.device_id, r.time)
        if dev is None:
            return None
        dev.update(rank=r.rank, rank_reason=r.reason)
        return {"devices": {dev["device_id"]: dict(dev)}}

    def _on_presence(self, r: PresenceRecord) -> dict[str, Any] | None:
        dev = self._touch(r.device_id, r.time)
        if dev is None:
            return None
        dev["online"] = bool(r.online)
        return {"devices": {dev["device_id"]: dict(dev)}}

    def _on_device_round(self, r: DeviceRoundRecord) -> dict[str, Any] | None:
        dev = self._touch(r.device_id, r.time)
        if dev is None:
            return None
        res = _mapping(r.resources)
        dev.update(last_round=r.round, last_status=r.status, drop_reason=r.drop_reason)
        dev["bytes_down"] += int(r.bytes_down or 0)
        dev["bytes_up"] += int(r.bytes_up or 0)
        if r.status == "accepted":
            dev["rounds_accepted"] += 1
            dev.update(cpu_s=res.get("cpu_s"), cpu_util_pct=res.get("cpu_util_pct"),
                       rss_peak_mb=res.get("rss_peak_mb"), energy_j=res.get("energy_j"),
                       train_loss=r.train_loss, train_acc=r.train_acc)
        if r.epsilon is not None:
            dev["epsilon"] = r.epsilon
        if r.status == "dropped":
            reason = _reason_key(r.drop_reason)
            dev["drops"][reason] = dev["drops"].get(reason, 0) + 1
        delta: dict[str, Any] = {"devices": {dev["device_id"]: dict(dev, drops=dict(dev["drops"]))}}
        cur = self.current
        if cur is not None and cur.get("round") == r.round and dev["device_id"] in cur["selected"]:
            cur["answered"][dev["device_id"]] = r.status
            delta["current"] = dict(cur, answered=dict(cur["answered"]))
        return delta

    def _on_device_status(self, r: DeviceStatusRecord) -> dict[str, Any] | None:
        dev = self._touch(r.device_id, r.time)
        if dev is None:
            return None
        dev["last_status"] = r.status
        if r.epsilon is not None:
            dev["epsilon"] = r.epsilon
        return {"devices": {dev["device_id"]: dict(dev)}}

    def _on_device_error(self, r: DeviceErrorRecord) -> dict[str, Any] | None:
        dev = self._touch(r.device_id, r.time)
        if dev is None:
            return None
        dev["error"] = str(r.error)[:300]
        return {"devices": {dev["device_id"]: dict(dev)}}

    def _on_round_open(self, r: RoundOpenRecord) -> dict[str, Any]:
        self.current = {"round": r.round, "attempt": r.attempt, "selected": list(r.selected or []),
                        "deadline": r.deadline, "opened_at": r.opened_at or r.time, "mode": r.mode, "answered": {}}
        return {"current": dict(self.current)}

    def _on_round(self, r: RoundRecord) -> dict[str, Any]:
        ev = _mapping(r.eval)
        row = {"round": r.round, "attempt": r.attempt, "status": r.status or "aggregated",
               "selected": len(r.selected or []), "accepted": r.accepted,
               "dropped": dict(r.dropped or {}), "bytes_down": r.bytes_down,
               "bytes_up": r.bytes_up, "cum_bytes": r.cum_bytes, "round_s": r.round_s,
               "aggregate_s": r.aggregate_s, "top1": ev.get("top1"), "loss": ev.get("loss"),
               "perplexity": ev.get("perplexity"), "devices_online": r.devices_online, "time": r.time}
        self.rounds.append(row)
        delta: dict[str, Any] = {"round": row}
        if self.current is not None and self.current.get("round") == r.round:
            self.current = None
            delta["current"] = None
        return delta

    def _on_dropped_message(self, r: DroppedMessage) -> dict[str, Any]:
        reason = _reason_key(r.reason)
        self.dropped_messages[reason] = self.dropped_messages.get(reason, 0) + r.count  # a summed record: count
        return {"dropped_messages": dict(self.dropped_messages)}

    def _on_resume(self, r: ResumeRecord) -> dict[str, Any]:
        self.current = None
        self.run["resumed_after"] = r.round
        return {"run": {"resumed_after": r.round}, "current": None}


_HANDLERS: dict[type[Record], Callable[[FederationState, Any], dict[str, Any] | None]] = {
    JoinRecord: FederationState._on_join,
    PresenceRecord: FederationState._on_presence,
    AssignmentRecord: FederationState._on_assignment,
    DeviceRoundRecord: FederationState._on_device_round,
    DeviceStatusRecord: FederationState._on_device_status,
    DeviceErrorRecord: FederationState._on_device_error,
    RoundOpenRecord: FederationState._on_round_open,
    RoundRecord: FederationState._on_round,
    DroppedMessage: FederationState._on_dropped_message,
    ResumeRecord: FederationState._on_resume,
}


def _reason_key(reason: Any) -> str:
    """Group "invalid: <detail>" drops under "invalid"."""
    text = str(reason or "unknown")
    return text.split(":", 1)[0].strip() or "unknown"


def _profile_line(profile: Any) -> str | None:
    """A short description of the device: its link profile if it has one, else its hardware."""
    if not isinstance(profile, dict):
        return None
    link = profile.get("link") or profile.get("link_profile")
    parts = [str(link)] if link else []
    for key in ("device_model", "accelerator"):
        if profile.get(key):
            parts.append(str(profile[key]))
            break
    if profile.get("cpu_count_logical"):
        parts.append(f"{profile['cpu_count_logical']} CPUs")
    if profile.get("ram_total_mb"):
        parts.append(f"{profile['ram_total_mb'] / 1024:.0f} GiB")
    return ", ".join(parts) or None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
