"""The server: admits devices, runs rounds with deadlines, aggregates, evaluates, checkpoints and logs.

All state changes happen on the receive loop's thread (FedML's `run()`): paho's thread only queues bytes,
and deadlines arrive as local timer messages, so no lock guards the round state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone
from fedpeft_edge.config import RunConfig, dump_config, load_config
from fedpeft_edge.errors import CheckpointError, FedPeftError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, transfer_seconds
from fedpeft_edge.peft import build_method
from fedpeft_edge.protocol import (
    SERVER_ID,
    ClientStatus,
    ConnectionReady,
    DeviceErrorReport,
    Finish,
    Join,
    JoinAck,
    Presence,
    ProtocolMessage,
    RoundTask,
    Timer,
    Update,
    parse,
)
from fedpeft_edge.protocol.report import DeviceReport
from fedpeft_edge.server.checkpoint import load_checkpoint, save_checkpoint
from fedpeft_edge.server.rounds import DropReason, OpenRound, RoundController
from fedpeft_edge.server.runlog import RunLog, read_metrics
from fedpeft_edge.server.strategy import ClientUpdate, build_strategy
from fedpeft_edge.training import evaluate, resolve_device
from fedpeft_edge.transport.manager import FedPeftCommManager, guarded
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    """An accepted update waiting for the round to close, with what the device reported."""

    update: ClientUpdate
    report: DeviceReport
    received_at: float
    upload_s: float | None


class ServerApp(FedPeftCommManager):
    """One federated run, from the first join to FINISH; `--resume` continues from the last checkpoint."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, backend: Any = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_id = cfg.common_args.run_id
        if cfg.device_args.num_threads:
            torch.set_num_threads(cfg.device_args.num_threads)
        self.device = resolve_device(cfg.device_args.device)
        torch.manual_seed(cfg.common_args.random_seed)  # same frozen tensors as every device (fingerprint)
        backbone = build_backbone(cfg.model_args)
        self.method = build_method(cfg.peft_args)
        self.model = self.method.apply(backbone.model).to(self.device)
        self.manifest = self.method.manifest(self.model)
        self.fingerprint = fingerprint_backbone(self.model, self.manifest)
        self.test_loader = self._server_test_loader(backbone.data_config)
        self.strategy = build_strategy(cfg.train_args)
        self.rounds = RoundController(cfg.train_args, cfg.common_args.random_seed)
        self.global_state = self.method.get_state(self.model)
        self.runlog = RunLog(self.run_dir)
        self.cum_bytes = 0
        self._pending: dict[str, _Pending] = {}
        self._timers: list[threading.Timer] = []
        self._round_blob: bytes | memoryview = b""
        self._finished = False
        if resume:
            self._resume()
        else:
            dump_config(cfg, self.run_dir / "config.yaml")
        self.meter = BandwidthMeter()
        super().__init__(cfg.comm_args, self.run_id, SERVER_ID, meter=self.meter, backend=backend)

    # --- set-up ---------------------------------------------------------------------------------------
    def _server_test_loader(self, input_spec: Any) -> Any:
        from fedpeft_edge.data import build_server_test_loader

        try:
            return build_server_test_loader(self.cfg.data_args, input_spec, self.cfg.common_args.random_seed)
        except FedPeftError as exc:
            log.warning("no server-side evaluation: %s", exc)
            return None

    def _resume(self) -> None:
        ck = load_checkpoint(self.run_dir)
        if ck.manifest_hash != self.manifest.hash or ck.fingerprint != self.fingerprint:
            raise CheckpointError(
                f"checkpoint of {self.run_dir} was written for manifest {ck.manifest_hash[:12]} / backbone "
                f"{ck.fingerprint[:12]}, this server builds {self.manifest.hash[:12]} / {self.fingerprint[:12]};"
                " resume with the run's own config.yaml"
            )
        self.method.set_state(self.model, ck.state)
        self.global_state = self.method.get_state(self.model)
        self.strategy.load_state_dict(ck.strategy_state)
        self.rounds.next_round = ck.round + 1
        self.runlog.truncate_after(ck.round)
        self.cum_bytes = int(ck.extra.get("cum_bytes", 0))
        self.runlog.write("resume", round=ck.round, next_round=ck.round + 1)
        log.info("resuming %s after round %d", self.run_dir, ck.round)

    def register_message_receive_handlers(self) -> None:
        self._typed: dict[type[ProtocolMessage], Any] = {
            ConnectionReady: self._on_connected,
            Join: self._on_join,
            Update: self._on_update,
            ClientStatus: self._on_status,
            DeviceErrorReport: self._on_device_error,
            Presence: self._on_presence,
            Timer: self._on_timer,
        }
        for cls in self._typed:
            self.register_message_receive_handler(cls.msg_type, guarded(self._dispatch))

    def _dispatch(self, msg: Any) -> None:
        typed = parse(msg)
        handler = self._typed.get(type(typed))
        if handler is not None:
            handler(typed)

    # --- devices --------------------------------------------------------------------------------------
    def _on_connected(self, _msg: Any) -> None:
        log.info("server %s connected; waiting for %d devices", self.run_id, self.cfg.train_args.min_devices)

    def _refusal(self, msg: Join) -> str | None:
        if msg.backbone_fingerprint != self.fingerprint:
            return (f"backbone fingerprint {msg.backbone_fingerprint[:12]} differs from "
                    f"the server's {self.fingerprint[:12]} ({self.cfg.model_args.model}, weights "
                    f"{self.cfg.model_args.weights}): run the agent with the server's model_args")
        if msg.manifest_hash != self.manifest.hash:
            return (f"manifest {msg.manifest_hash[:12]} differs from the server's "
                    f"{self.manifest.hash[:12]} (method {self.manifest.method}): run the agent with the server's "
                    "peft_args and model_args")
        return None

    def _on_join(self, msg: Join) -> None:
        device_id = msg.sender
        reason = self._refusal(msg)
        dev = self.rounds.device(device_id)
        dev.accepted, dev.online = reason is None, True
        dev.exhausted = msg.exhausted
        dev.profile = msg.profile or {}
        dev.data_stats = msg.data_stats or {}
        self.runlog.write("join", device_id=device_id, accepted=reason is None, reason=reason,
                          client_idx=msg.client_idx, profile=dev.profile,
                          data_stats=dev.data_stats, num_samples=msg.num_samples)
        self.send_message(JoinAck(receiver=device_id, accepted=reason is None, reason=reason).to_message())
        if reason is not None:
            log.warning("refused device %s: %s", device_id, reason)
            return
        log.info("device %s joined (%d online)", device_id, len(self.rounds.eligible()))
        cur = self.rounds.current
        if cur is not None and device_id in cur.selected and device_id not in cur.received:
            self._send_sync(device_id, cur)  # it reconnected mid-round: give it the round again
        self._maybe_open()

    def _on_presence(self, msg: Presence) -> None:
        node, online = msg.node, msg.online
        if node == str(SERVER_ID) or node not in self.rounds.devices:
            return
        self.rounds.devices[node].online = online
        if not online:
            log.info("device %s went offline", node)
            self._maybe_close_early()

    def _on_status(self, msg: ClientStatus) -> None:
        device_id = msg.sender
        if device_id in self.rounds.devices and msg.exhausted:
            self.rounds.devices[device_id].exhausted = True
            self.runlog.write("device_status", device_id=device_id, status=msg.status,
                              epsilon=msg.epsilon, round=self._round_index())
            self._fail_device(device_id, DropReason.DEVICE_ERROR)

    def _on_device_error(self, msg: DeviceErrorReport) -> None:
        device_id = msg.sender
        log.warning("device %s failed round %s: %s", device_id, msg.round, msg.error)
        self.runlog.write("device_error", device_id=device_id, round=msg.round, error=msg.error)
        if msg.round == self._round_index():
            self._fail_device(device_id, DropReason.DEVICE_ERROR)

    def _fail_device(self, device_id: str, reason: DropReason) -> None:
        cur = self.rounds.current
        if cur is not None and device_id in cur.selected and device_id not in cur.received:
            cur.failed.add(device_id)
            self.rounds.record_drop(reason)
            self._device_record(cur, device_id, "dropped", reason.value, None)
            self._maybe_close_early()

    def _round_index(self) -> int | None:
        return self.rounds.current.index if self.rounds.current else None

    # --- rounds ---------------------------------------------------------------------------------------
    def _maybe_open(self) -> None:
        if self._finished:
            return
        if self.rounds.current is None and self.rounds.all_spent():
            log.warning("every device has spent its privacy budget: ending the run after round %d",
                        self.rounds.next_round - 1)
            self._finish_run(reason="all devices spent their privacy budget")
            return
        if not self.rounds.can_open():
            return
        if self.rounds.finished:
            self._finish_run()
            return
        cur = self.rounds.open_round(time.time())
        self._pending.clear()
        self._round_blob = encode_tensors(self.global_state, self.manifest, self.cfg.comm_args.encoding)
        log.info("round %d (attempt %d): %s", cur.index, cur.attempt, ", ".join(cur.selected))
        for device_id in cur.selected:
            self._send_sync(device_id, cur)
        self._start_timer(self.cfg.train_args.round_timeout_s, "deadline", cur)

    def _send_sync(self, device_id: str, cur: OpenRound) -> None:
        self.send_message(RoundTask(
            receiver=device_id, round=cur.index, attempt=cur.attempt, blob=self._round_blob,
            manifest_hash=self.manifest.hash, encoding=self.cfg.comm_args.encoding, deadline=cur.deadline,
            evaluate=self._device_eval(cur.index), sent_at=time.time()).to_message())

    def _device_eval(self, round_idx: int) -> bool:
        """Devices evaluate the global model they receive when asked to, or when the server has no test set."""
        wanted = self.cfg.train_args.evaluate_on_devices or self.test_loader is None
        return wanted and (round_idx - 1) % self.cfg.train_args.eval_every == 0

    def _start_timer(self, delay: float, name: str, cur: OpenRound) -> None:
        msg = Timer(name=name, round=cur.index, attempt=cur.attempt).to_message()
        timer = threading.Timer(delay, self.post_local, args=(msg,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _on_timer(self, msg: Timer) -> None:
        cur = self.rounds.current
        if cur is None or msg.round != cur.index or msg.attempt != cur.attempt:
            return  # the timer of a round that already closed
        self._close_round()

    def _on_update(self, msg: Update) -> None:
        device_id = msg.sender
        now = time.time()
        round_idx = msg.round
        reason = self.rounds.judge_update(device_id, round_idx, now)
        cur = self.rounds.current
        if reason is not None:
            log.info("dropped update from %s for round %s: %s", device_id, round_idx, reason.value)
            if cur is not None and reason is not DropReason.DUPLICATE and device_id in cur.selected:
                self._device_record(cur, device_id, "dropped", reason.value, msg.report)
            return
        if cur is None:  # judge_update accepts only for an open round
            return
        try:
            update = self._decode_update(device_id, msg)
        except (FedPeftError, ValueError) as exc:
            self.rounds.unaccept(device_id)
            cur.failed.add(device_id)
            self.rounds.record_drop(DropReason.INVALID)
            log.warning("invalid update from %s: %s", device_id, exc)
            self._device_record(cur, device_id, "dropped", f"invalid: {exc}", msg.report)
            self._maybe_close_early()
            return
        mine = [t for t in self.meter.transfers(round=cur.index, peer=device_id) if t.msg_id == msg.msg_id]
        upload_s = transfer_seconds(mine, msg.sent_at)
        self._pending[device_id] = _Pending(update, msg.report, now, upload_s)
        self._maybe_close_early()

    def _decode_update(self, device_id: str, msg: Update) -> ClientUpdate:
        tensors = decode_tensors(msg.blob, self.manifest, self.manifest.hash, self.cfg.comm_args.max_update_bytes)
        return ClientUpdate(device_id, msg.num_samples, tensors, self.cfg.train_args.send_delta)

    def _maybe_close_early(self) -> None:
        if self.rounds.all_in():
            self._close_round()

    def _close_round(self) -> None:
        cur = self.rounds.current
        if cur is None:
            return
        t0 = time.time()
        ok = self.rounds.quorum() and bool(self._pending)
        if ok:
            updates = [self._pending[d].update for d in sorted(self._pending)]
            self.global_state = self.strategy.aggregate(self.global_state, updates)
            self.method.set_state(self.model, self.global_state)
        aggregate_s = time.time() - t0
        self.rounds.close_round(aggregated=ok)
        for d in cur.selected:
            if d in self._pending:
                p = self._pending[d]
                self._device_record(cur, d, "accepted", None, p.report, p.upload_s, p.received_at)
            elif d not in cur.failed:
                self._device_record(cur, d, "dropped", "no_update_by_deadline", None)
        t_eval = time.time()
        eval_res = (self._evaluate(cur.index) or self._device_eval_mean()) if ok else None
        if eval_res is not None:
            eval_res["eval_s"] = time.time() - t_eval
        self._round_record(cur, ok, aggregate_s, eval_res)
        if ok:
            self._checkpoint(cur.index)
        else:
            log.warning("round %d closed with %d of %d required updates (deadline passed, or every selected device "
                        "failed or went offline); retrying it", cur.index, len(cur.received),
                        self.cfg.train_args.min_updates)
        self._maybe_open()
        if not self._finished and self.rounds.current is None and self.rounds.finished:
            self._finish_run()

    def _evaluate(self, round_idx: int) -> dict[str, Any] | None:
        if self.test_loader is None or round_idx % self.cfg.train_args.eval_every:
            return None
        res = evaluate(self.model, self.test_loader, self.device)
        return {"loss": res.loss, "top1": res.top1, "samples": res.samples}

    def _device_eval_mean(self) -> dict[str, Any] | None:
        """Sample-weighted mean of the devices' evaluations of this round's global model (no server test set)."""
        evals = [p.report.global_eval for p in self._pending.values()
                 if p.report.global_eval is not None and p.report.global_eval.samples > 0]
        if not evals:
            return None
        n = sum(e.samples for e in evals)
        return {"loss": sum(e.loss * e.samples for e in evals) / n,
                "top1": sum(e.top1 * e.samples for e in evals) / n, "samples": n, "where": "devices"}

    # --- records --------------------------------------------------------------------------------------
    def _device_record(
        self, cur: OpenRound, device_id: str, status: str, reason: str | None, report: DeviceReport | None,
        upload_s: float | None = None, received_at: float | None = None,
    ) -> None:
        fields = (report or DeviceReport()).record_fields()
        down = self.meter.transfers(round=cur.index, peer=device_id)
        sent = [t for t in down if t.sent]
        got = [t for t in down if not t.sent]
        download_s = fields.pop("download_s")
        if download_s is None:
            download_s = max((t.duration_s for t in sent), default=None)
        self.runlog.write(
            "device_round", round=cur.index, attempt=cur.attempt, device_id=device_id, status=status,
            drop_reason=reason, num_samples=self._pending[device_id].update.num_samples
            if device_id in self._pending else None,
            bytes_down=sum(t.mqtt_bytes for t in sent), bytes_up=sum(t.mqtt_bytes for t in got),
            msgs_down=len(sent), msgs_up=len(got),
            download_s=download_s, upload_s=upload_s, **fields,
            response_s=(received_at - cur.opened_at) if received_at else None,
        )

    def _round_record(self, cur: OpenRound, ok: bool, aggregate_s: float, eval_res: dict[str, Any] | None) -> None:
        totals = self.meter.transfers(round=cur.index)
        down = sum(t.mqtt_bytes for t in totals if t.sent)
        up = sum(t.mqtt_bytes for t in totals if not t.sent)
        self.cum_bytes += down + up
        self.runlog.write(
            "round", round=cur.index, attempt=cur.attempt, status="aggregated" if ok else "failed",
            selected=list(cur.selected), accepted=len(self._pending) if ok else 0,
            dropped=dict(cur.dropped), bytes_down=down, bytes_up=up, cum_bytes=self.cum_bytes,
            round_s=time.time() - cur.opened_at, aggregate_s=aggregate_s, eval=eval_res,
            devices_online=sum(1 for d in self.rounds.devices.values() if d.online and d.accepted),
        )
        self.meter.forget(up_to_round=cur.index)

    def _checkpoint(self, round_idx: int) -> None:
        if round_idx % self.cfg.tracking_args.checkpoint_every and round_idx != self.cfg.train_args.comm_round:
            return
        save_checkpoint(
            self.run_dir, round_idx, self.global_state, manifest_json=self.manifest.to_json(),
            manifest_hash=self.manifest.hash, fingerprint=self.fingerprint, run_id=self.run_id,
            strategy_state=self.strategy.state_dict(),
            extra={"cum_bytes": self.cum_bytes, "seed": self.cfg.common_args.random_seed},
        )

    def _finish_run(self, reason: str = "completed") -> None:
        self._finished = True
        for device_id, dev in self.rounds.devices.items():
            if dev.accepted:
                self.send_message(Finish(receiver=device_id, reason=reason).to_message())
        summary = build_summary(self.run_dir, self.manifest.num_params, self.fingerprint)
        summary["end_reason"] = reason
        self.runlog.write_summary(summary)
        log.info("run %s finished after %d rounds", self.run_id, self.cfg.train_args.comm_round)
        for t in self._timers:
            t.cancel()
        self.finish()

    def run_until_done(self) -> None:
        """Serve until the last round closed; the run directory then holds summary.json."""
        try:
            self.run()
        finally:
            for t in self._timers:
                t.cancel()
            self.runlog.close()


def build_summary(run_dir: Path, shared_params: int, fingerprint: str) -> dict[str, Any]:
    """summary.json: final accuracy, bytes per direction and per round, from the records themselves."""
    every = read_metrics(run_dir, "round")  # failed attempts too: their bytes crossed the wire
    rounds = [r for r in every if r.get("status") == "aggregated"]
    evals = [r["eval"]["top1"] for r in rounds if r.get("eval")]
    down = sum(r["bytes_down"] for r in every)
    up = sum(r["bytes_up"] for r in every)
    return {
        "rounds": len(rounds),
        "final_top1": evals[-1] if evals else None,
        "best_top1": max(evals) if evals else None,
        "bytes_down": down,
        "bytes_up": up,
        "bytes_total": down + up,
        "bytes_per_round": (down + up) / len(rounds) if rounds else None,
        "shared_params": shared_params,
        "backbone_fingerprint": fingerprint,
        "dropped": _count_drops(every),
    }


def _count_drops(rounds: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rounds:
        for reason, n in (r.get("dropped") or {}).items():
            out[reason] = out.get(reason, 0) + int(n)
    return out


def load_server_config(config: str | None, resume: str | None) -> tuple[RunConfig, Path]:
    """The config to run (a resumed run uses its own saved config.yaml) and the run directory."""
    if resume:
        run_dir = Path(resume)
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise CheckpointError(f"{run_dir} holds no config.yaml; pass the directory of an earlier server run")
        return load_config(saved), run_dir
    if not config:
        raise CheckpointError("pass --config CONFIG.yaml for a new run or --resume RUN_DIR to continue one")
    cfg = load_config(config)
    return cfg, Path(cfg.tracking_args.run_dir) / cfg.common_args.run_id
