"""The server as a transport-free round engine: typed events in, typed messages out.

The engine is the core both ways of running rounds share: joins, presence, admission of updates into the running
aggregation, records, checkpoints and the end of the run. When and to whom tasks go, which update counts and when a
round closes is its round policy's (server/round_policy.py): `SyncRounds` (server/sync_rounds.py) or `AsyncRounds`
(server/async_rounds.py), picked once from `train_args.round_mode` when the engine is built.

`handle(event)` takes a device's message (Join, Update, DeviceErrorReport, ClientStatus), a Presence change or
a Timer and returns what to send (JoinAck, RoundTask, Finish). Time comes from an injected clock, deadlines
from an injected timer scheduler; the run log, checkpoints, evaluation and metered traffic are injected too
(server/ports.py), so tests drive the engine with no broker and server/manager.py binds it to the transport.

Liveness: a round's deadline is armed before its first task is produced; whatever fails after a round closed
(records, evaluation, checkpoint) is logged and the next round still opens; `train_args.join_timeout_s` is
enforced (the run starts with the devices that joined if they reach min_updates, else it ends with an error
naming both settings); a round is retried at most `train_args.max_round_retries` times; joins and task
re-sends are rate-limited per device. Per-message work is O(1) in the number of devices: updates go into a
running aggregation as they arrive and the round knows in O(1) whether it still waits for anyone.

An update trained on an older global model (the async policy's) enters as a delta from the model it trained on,
weighted by 1/sqrt(1+s) for a staleness of s versions (`admit(..., staleness=s)`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from fedpeft_edge.config import RunConfig, TrainArgs
from fedpeft_edge.drops import DropRecorder
from fedpeft_edge.errors import FedPeftError
from fedpeft_edge.peft.base import Manifest
from fedpeft_edge.peft.shapes import ShapePlan
from fedpeft_edge.protocol import (
    SERVER_ID,
    ClientStatus,
    DeviceErrorReport,
    DeviceReport,
    Finish,
    Join,
    JoinAck,
    LocalEvent,
    Presence,
    ProtocolMessage,
    RoundTask,
    SharedModel,
    Throttled,
    Timer,
    Update,
)
from fedpeft_edge.records import (
    AssignmentRecord,
    DeviceErrorRecord,
    DeviceStatusRecord,
    JoinRecord,
    PresenceRecord,
    ResumeRecord,
    RoundOpenRecord,
    RoundRecord,
)
from fedpeft_edge.server.admission import NormBoundExceeded, UpdateAdmission
from fedpeft_edge.server.async_rounds import AsyncRounds
from fedpeft_edge.server.join_check import join_refusal
from fedpeft_edge.server.ports import CheckpointStore, Clock, Evaluator, RunLogWriter, TimerScheduler, Traffic
from fedpeft_edge.server.records import Accepted, DivergenceWatch, RoundRecords, build_summary
from fedpeft_edge.server.robustness import NormBound, effective_train_args, is_robust, weight_cap
from fedpeft_edge.server.round_policy import RoundPolicy
from fedpeft_edge.server.rounds import DropReason, OpenRound, RoundController
from fedpeft_edge.server.strategy import Aggregation, Strategy
from fedpeft_edge.server.sync_rounds import SyncRounds
from fedpeft_edge.wire.codec import TensorParts, blob_nbytes, encode_update

log = logging.getLogger(__name__)

DEADLINE, JOIN_TIMEOUT, UNMUTE = "deadline", "join_timeout", "unmute"
POLICIES: dict[str, type[RoundPolicy]] = {"sync": SyncRounds, "async": AsyncRounds}  # train_args.round_mode


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What the engine needs to know about the run (no backbone, no transport)."""

    train_args: TrainArgs
    seed: int
    run_id: str
    manifest: Manifest
    fingerprint: str
    encoding: str = "fp32"
    max_update_bytes: int = 2_000_000_000
    num_classes: int = 10
    checkpoint_every: int = 1
    model_desc: str = ""  # "model X, weights Y" for refusal texts
    bytes_kind: str = "wire"  # what the traffic figures count: "wire" (MQTT) or "encoded" (in-process simulation)
    model_delivery: str = "per_device"  # comm_args.model_delivery: "shared" sends each round's model once
    class_names: tuple[str, ...] | None = None  # the run's label order, sent at join (None: unknown, unchecked)
    robust: bool = False  # server/robustness.py: derive a norm bound from the first rounds if none is set

    @classmethod
    def from_config(cls, cfg: RunConfig, manifest: Manifest, fingerprint: str, bytes_kind: str = "wire",
                    class_names: tuple[str, ...] | None = None) -> RunSpec:
        return cls(effective_train_args(cfg), cfg.common_args.random_seed, cfg.common_args.run_id, manifest,
                   fingerprint, cfg.comm_args.encoding, cfg.comm_args.max_update_bytes, cfg.model_args.num_classes,
                   cfg.tracking_args.checkpoint_every,
                   f"{cfg.model_args.model}, weights {cfg.model_args.weights}", bytes_kind,
                   cfg.comm_args.model_delivery, class_names=class_names,
                   robust=is_robust(cfg.train_args, cfg.comm_args.require_signatures))


class RoundEngine:
    """One federated run's round flow, from the first join to Finish, as a state machine."""

    def __init__(
        self, spec: RunSpec, global_state: Mapping[str, torch.Tensor], strategy: Strategy, *, clock: Clock,
        timers: TimerScheduler, runlog: RunLogWriter, checkpoints: CheckpointStore, evaluator: Evaluator,
        traffic: Traffic, shapes: ShapePlan | None = None,
    ) -> None:
        self.spec = spec
        self.shapes = shapes or ShapePlan()  # per-device shapes (LoRA ranks); the default: the manifest for all
        self.args = spec.train_args
        self.global_state: dict[str, torch.Tensor] = dict(global_state)
        self.strategy = strategy
        self.clock, self.timers, self.runlog = clock, timers, runlog
        self.checkpoints, self.evaluator, self.traffic = checkpoints, evaluator, traffic
        self.rounds = RoundController(self.args, spec.seed)
        self.policy: RoundPolicy = POLICIES[self.args.round_mode](self)  # the one place the mode is read
        self.records = RoundRecords(runlog, traffic, self.policy.name, spec.bytes_kind)
        self.divergence = DivergenceWatch(runlog, spec.num_classes, self.args.learning_rate)
        self.norm_bound = NormBound(self.args.max_update_norm, spec.robust, self.args.norm_bound_rounds,
                                    self.args.norm_bound_factor)
        self.admission = UpdateAdmission(spec.manifest, spec.max_update_bytes, self.args.send_delta,
                                         self.args.max_update_norm, self.args.update_norm_action,
                                         measure=self.norm_bound.measuring)
        self._weight_cap: int | None = None  # sample_weight_clip's cap, fixed when a round opens
        self.drops = DropRecorder(runlog, clock=clock.now)  # the run's one record of drops (with the transport's)
        self.finished = False
        self.end_reason: str | None = None
        self._out: list[ProtocolMessage] = []
        self._agg: Aggregation | None = None
        self._accepted: list[Accepted] = []
        self._blob: bytes | memoryview | TensorParts = b""
        # shared delivery: the id of the model message that carries _blob, and when it was sent (a device that
        # joined later never received it: its task carries the tensors)
        self._model_id: str | None = None
        self._model_at = 0.0

    # --- entry points ---------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The global model's version: the number of aggregations so far."""
        return self.rounds.next_round - 1

    def resume(self) -> int | None:
        """Continue from the latest checkpoint (None: there is none, a fresh run)."""
        ck = self.checkpoints.load()
        if ck is None:
            return None
        self.global_state = dict(ck.state)
        self.strategy.load_state_dict(ck.strategy_state)
        self.rounds.next_round = ck.round + 1
        self.runlog.truncate_after(ck.round)
        self.records.cum_bytes = int(ck.extra.get("cum_bytes", 0))
        self.norm_bound.restore(ck.extra.get("norm_bound"))
        self.admission.max_norm = self.norm_bound.bound
        for device_id, declared in dict(ck.extra.get("declared_samples") or {}).items():
            self.rounds.device(str(device_id)).declared_samples = int(declared)
        self.runlog.append(ResumeRecord(round=ck.round, next_round=ck.round + 1))
        log.info("resuming after round %d", ck.round)
        return ck.round

    def start(self) -> list[ProtocolMessage]:
        """Arm the join timeout; call once before the first event."""
        self.timers.schedule(self.args.join_timeout_s, Timer(name=JOIN_TIMEOUT))
        return self._flush()

    def handle(self, event: ProtocolMessage | LocalEvent) -> list[ProtocolMessage]:
        """Apply one event (a device's message, or a local Timer / Presence); returns the messages to send."""
        if self.finished:
            return []
        handler = {Join: self._on_join, Update: self._on_update, ClientStatus: self._on_status,
                   DeviceErrorReport: self._on_device_error, Presence: self._on_presence,
                   Throttled: self._on_throttled, Timer: self._on_timer}.get(type(event))
        if handler is not None:
            handler(event)  # type: ignore[operator]
        return self._flush()

    def dropped(self, sender: str | None, reason: DropReason, detail: str, topic: str | None = None,
                nbytes: int | None = None) -> list[ProtocolMessage]:
        """A message refused before it became an event (malformed, unverifiable ...): record why (and log it)."""
        self.drops.drop(sender, reason, detail, topic, nbytes)
        return []

    def refuse_join(self, sender: str, error: str) -> list[ProtocolMessage]:
        """A join that failed to parse: tell the device why (it cannot have been admitted with it)."""
        self.dropped(sender, DropReason.INVALID, error)
        return [JoinAck(receiver=sender, accepted=False, reason=f"join refused: {error}")]

    def _flush(self) -> list[ProtocolMessage]:
        out, self._out = self._out, []
        return out

    def emit(self, msg: ProtocolMessage) -> None:
        """Queue a message to send: returned by the `handle` or `start` call under way."""
        self._out.append(msg)

    # --- devices --------------------------------------------------------------------------------------------
    def _refusal(self, msg: Join) -> str | None:
        spec = self.spec
        return join_refusal(manifest=spec.manifest, fingerprint=spec.fingerprint, num_classes=spec.num_classes,
                            model_desc=spec.model_desc, class_names=spec.class_names,
                            device_manifest_hash=msg.manifest_hash, device_manifest=msg.manifest,
                            device_fingerprint=msg.backbone_fingerprint, device_classes=msg.class_names)

    def _join_allowed(self, device_id: str, now: float) -> bool:
        dev = self.rounds.devices.get(device_id)
        if dev is None:
            return True
        while dev.joins and dev.joins[0] < now - 60.0:
            dev.joins.popleft()
        return len(dev.joins) < self.args.join_rate_per_min

    def _on_join(self, msg: Join) -> None:
        now = self.clock.now()
        if not self._join_allowed(msg.sender, now):
            self.drops.drop(msg.sender, DropReason.RATE_LIMITED,
                            f"more than train_args.join_rate_per_min={self.args.join_rate_per_min} joins a minute")
            return
        reason = self._refusal(msg)
        dev = self.rounds.admit(msg.sender, reason is None, msg.exhausted)
        dev.joins.append(now)
        dev.profile, dev.data_stats = msg.profile or {}, msg.data_stats or {}
        dev.declared_samples = self._declared(dev.declared_samples, msg.num_samples, reason is None)
        dev.joined_at = now
        self.rounds.set_online(msg.sender, True)
        self.policy.came_online(msg.sender)
        self.runlog.append(JoinRecord(device_id=msg.sender, accepted=reason is None, reason=reason,
                                      client_idx=msg.client_idx, profile=dev.profile, data_stats=dev.data_stats,
                                      num_samples=msg.num_samples))
        self._out.append(JoinAck(receiver=msg.sender, accepted=reason is None, reason=reason,
                                 class_names=self.spec.class_names if reason is None else None))
        if reason is not None:
            log.warning("refused device %s: %s", msg.sender, reason)
            return
        log.info("device %s joined", msg.sender)
        self._assigned(msg.sender, self.shapes.assign(msg.sender, dev.profile))
        self._resend_if_due(msg.sender, now)
        self.policy.joined(msg.sender, now)
        self._maybe_open()

    def _assigned(self, device_id: str, assignment: dict[str, Any] | None, after_round: int | None = None) -> None:
        """Record what the shape plan gave a device (its LoRA rank and why), if anything: at join, or after a
        round (`after_round`) from what the device measured in it."""
        if assignment is not None:
            self.runlog.append(AssignmentRecord.from_dict({**assignment, "device_id": device_id,
                                                           "after_round": after_round}))

    def _declared(self, before: int, claimed: int, accepted: bool) -> int:
        """A device's sample count is fixed at its first accepted join for the run: a re-join may lower it,
        never raise it; max_declared_samples caps it."""
        cap = self.args.max_declared_samples
        claimed = min(claimed, cap) if cap is not None else claimed
        if before > 0:
            return min(before, claimed) if claimed > 0 else before
        return claimed if accepted else 0

    def _resend_if_due(self, device_id: str, now: float) -> None:
        """A device that rejoins mid-round (reconnect, restart) gets its task again, a bounded number of times."""
        dev = self.rounds.devices[device_id]
        cur = self.rounds.current
        if cur is None or not self.policy.task_owed(device_id, cur):
            return
        if dev.resends >= self.args.resend_rate_per_round:
            self.drops.drop(device_id, DropReason.RATE_LIMITED, f"more than train_args.resend_rate_per_round="
                            f"{self.args.resend_rate_per_round} task re-sends this round")
            return
        dev.resends += 1  # a re-sent task carries the tensors: the device may have missed the shared model
        self.policy.resend(device_id, cur, now)

    def _on_presence(self, msg: Presence) -> None:
        dev = self.rounds.devices.get(msg.node)
        if msg.node == str(SERVER_ID) or dev is None or dev.online == msg.online:
            return
        self.rounds.set_online(msg.node, msg.online)
        self.runlog.append(PresenceRecord(device_id=msg.node, online=msg.online))
        if msg.online:
            self.policy.came_online(msg.node)
            return
        log.info("device %s went offline", msg.node)
        self.policy.went_offline(msg.node)

    def _on_throttled(self, msg: Throttled) -> None:
        """Packets naming a device went over its rate and were dropped unread (the transport recorded them): its
        update may be among them, so the open round stops waiting for it (a round still closes early only with
        its quorum in). A flood by whoever holds one device's credentials costs that device its round, not the
        honest devices their round time."""
        dev = self.rounds.devices.get(msg.node)
        if dev is None:
            return
        log.debug("device %s went over its packet rate (%d packets dropped unread)", msg.node, msg.packets)
        if msg.shed_s > 0 and not dev.muted:  # unheard meanwhile: neither sampled nor waited for
            self.rounds.set_muted(msg.node, True)  # before the round may close (and the next one sample)
            self.timers.schedule(msg.shed_s, Timer(name=UNMUTE, about=msg.node))
        self.policy.fail_device(msg.node, DropReason.RATE_LIMITED)

    def _on_status(self, msg: ClientStatus) -> None:
        dev = self.rounds.devices.get(msg.sender)
        if dev is None or not msg.exhausted:
            return
        self.rounds.mark_exhausted(msg.sender)
        self.runlog.append(DeviceStatusRecord(device_id=msg.sender, status=msg.status, epsilon=msg.epsilon,
                                              round=self.round_index()))
        self.policy.fail_device(msg.sender, DropReason.DEVICE_ERROR)

    def _on_device_error(self, msg: DeviceErrorReport) -> None:
        if msg.sender not in self.rounds.devices:
            self.drops.drop(msg.sender, DropReason.UNKNOWN_DEVICE, "device error report")
            return
        log.warning("device %s failed round %s: %s", msg.sender, msg.round, msg.error)
        self.runlog.append(DeviceErrorRecord(device_id=msg.sender, round=msg.round, error=msg.error))
        self.policy.device_error(msg.sender, msg.round, msg.error)

    def round_index(self) -> int | None:
        """The open round's index (None between rounds)."""
        return self.rounds.current.index if self.rounds.current else None

    def device_dropped(self, cur: OpenRound, device_id: str, reason: DropReason, report: DeviceReport | None = None,
                       detail: str | None = None, **extra: Any) -> None:
        """Write a device's `dropped` device_round record for `cur`."""
        self.records.device(cur.index, cur.retry, cur.opened_at, device_id, "dropped", reason, report=report,
                            detail=detail, **extra)

    # --- timers ---------------------------------------------------------------------------------------------
    def _on_timer(self, msg: Timer) -> None:
        if msg.name == JOIN_TIMEOUT:
            self._on_join_timeout()
            return
        if msg.name == UNMUTE:
            if msg.about in self.rounds.devices:
                self.rounds.set_muted(msg.about, False)
                self._maybe_open()
            return
        cur = self.rounds.current
        if msg.name != DEADLINE or cur is None or msg.round != cur.index or msg.retry != cur.retry:
            return  # the timer of a round that already closed
        self.policy.deadline(cur)

    def _on_join_timeout(self) -> None:
        if self.rounds.started or self.finished:
            return
        n = self.rounds.eligible_count()
        if n >= max(1, self.args.min_updates):
            log.warning("join timeout (train_args.join_timeout_s=%gs): starting with the %d device(s) that joined "
                        "(train_args.min_devices=%d)", self.args.join_timeout_s, n, self.args.min_devices)
            self.rounds.join_timed_out = True
            self._maybe_open()
            return
        self.finish(f"join timeout: {n} of train_args.min_devices={self.args.min_devices} devices joined within "
                     f"train_args.join_timeout_s={self.args.join_timeout_s:g}s (at least train_args.min_updates="
                     f"{self.args.min_updates} needed to start); start more agents, check they reach the broker, "
                     "or raise join_timeout_s")

    # --- opening rounds -------------------------------------------------------------------------------------
    def _can_start(self) -> bool:
        if self.finished or self.rounds.current is not None:
            return False
        if self.rounds.all_spent():
            log.warning("every device has spent its privacy budget: ending the run after round %d", self.version)
            self.finish("all devices spent their privacy budget")
            return False
        if not self.rounds.can_open():
            return False
        if self.rounds.finished:
            self.finish()
            return False
        return True

    def _maybe_open(self) -> None:
        if not self._can_start():
            return
        now = self.clock.now()
        cur = self.rounds.open_round(now)
        self._weight_cap = weight_cap((d.declared_samples for d in self.rounds.devices.values() if d.accepted),
                                      self.args.sample_weight_clip)
        if self._agg is None:  # an async round retried after a failed attempt keeps its buffer
            self._agg = self.strategy.begin(self.global_state)
            self._accepted = []
        # The deadline first: whatever happens while handing out tasks, this round closes.
        self.timers.schedule(self.args.round_timeout_s, Timer(name=DEADLINE, round=cur.index, retry=cur.retry))
        # Large models go out as views of global_state: aggregation replaces its tensors, never writes them.
        self._blob = encode_update(self.global_state, self.spec.manifest, self.spec.encoding)
        self._share_model(cur, now)
        selected = self.policy.open(cur, now)
        self.runlog.append(RoundOpenRecord(round=cur.index, attempt=cur.retry, selected=selected,
                                           deadline=cur.deadline, opened_at=cur.opened_at, mode=self.policy.name))

    def _share_model(self, cur: OpenRound, now: float) -> None:
        """Shared delivery: the round's model goes out once, before its tasks, to every device."""
        if self.spec.model_delivery != "shared":
            return
        self._model_id, self._model_at = uuid.uuid4().hex, now
        self._out.append(SharedModel(model_id=self._model_id, round=cur.index, blob=self._blob,
                                     manifest_hash=self.spec.manifest.hash, encoding=self.spec.encoding,
                                     model_version=self.version))

    def task(self, device_id: str, cur: OpenRound, now: float, *, deadline: float, retry: int = 0,
             task_number: int = 0, full: bool = False) -> RoundTask:
        """A device's task for `cur`, carrying the round's `retry` (sync) or its own `task_number` (async). With
        shared delivery it names the shared model instead of carrying it, unless `full` or the device joined after
        that model went out."""
        shared = (self._model_id is not None and not full
                  and self.rounds.devices[device_id].joined_at <= self._model_at)
        return RoundTask(
            receiver=device_id, round=cur.index, retry=retry, task_number=task_number,
            blob=b"" if shared else self._blob, manifest_hash=self.spec.manifest.hash, encoding=self.spec.encoding,
            deadline=deadline, evaluate=self._device_eval(cur.index), model_version=self.version,
            mode=self.policy.name, sent_at=now,
            model_id=self._model_id if shared else None, model_bytes=blob_nbytes(self._blob) if shared else None,
            rank=self.shapes.rank(device_id),
        )

    def _device_eval(self, round_idx: int) -> bool:
        """Devices evaluate the global model they receive when asked to, or when the server has no test set."""
        wanted = self.args.evaluate_on_devices or not self.evaluator.available
        return wanted and (round_idx - 1) % self.args.eval_every == 0

    # --- updates --------------------------------------------------------------------------------------------
    def _on_update(self, msg: Update) -> None:
        self.policy.update(msg)

    @property
    def aggregating(self) -> bool:
        """A running aggregation is open (from a round's opening to its close; async keeps it over a retry)."""
        return self._agg is not None

    @property
    def buffered(self) -> int:
        """Updates in the running aggregation."""
        return self._agg.count if self._agg is not None else 0

    @property
    def has_accepted(self) -> bool:
        """At least one update was admitted since the round opened."""
        return bool(self._accepted)

    def admit(self, cur: OpenRound, msg: Update, base: Mapping[str, torch.Tensor], now: float,
              staleness: int | None, task_round: int | None = None) -> Accepted | None:
        """Decode, cap and bound an update and add it to the running aggregation; None if it was dropped. With a
        `staleness` it enters as a delta from `base` (the model it trained on), weighted by 1/sqrt(1+staleness)."""
        dev = self.rounds.devices[msg.sender]
        try:
            adm = self.admission.admit(msg, base, dev.declared_samples, as_delta=staleness is not None,
                                       layout=self.shapes.layout(msg.sender))
        except NormBoundExceeded as exc:
            cur.drop(DropReason.NORM_BOUND)
            log.warning("dropped update from %s: %s", msg.sender, exc)
            self.device_dropped(cur, msg.sender, DropReason.NORM_BOUND, msg.report,
                                update_norm=exc.norm, norm_action="dropped")
            return None
        except (FedPeftError, ValueError) as exc:
            cur.drop(DropReason.INVALID)
            log.warning("invalid update from %s: %s", msg.sender, exc)
            self.device_dropped(cur, msg.sender, DropReason.INVALID, msg.report, detail=str(exc))
            return None
        weight = 1.0 / math.sqrt(1.0 + staleness) if staleness is not None else 1.0
        update = dataclasses.replace(adm.update, scale=weight) if weight != 1.0 else adm.update
        samples = adm.num_samples
        if self._weight_cap is not None and samples > self._weight_cap:
            samples = self._weight_cap
            update = dataclasses.replace(update, num_samples=samples)
        if self._agg is None:  # an open round always has an aggregation
            return None
        self._agg.add(update)
        rnd = task_round if task_round is not None else cur.index
        acc = Accepted(msg.sender, rnd, msg.report, samples, dev.declared_samples, now,
                       self.traffic.upload_seconds(rnd, msg.sender, msg.msg_id, msg.sent_at), adm.norm,
                       adm.norm_action, staleness, weight)
        self._accepted.append(acc)
        return acc

    # --- closing rounds -------------------------------------------------------------------------------------
    def end_round(self, cur: OpenRound, ok: bool, aggregate_s: float) -> None:
        """Close the open round `cur` (aggregated if `ok`), write its records, then open the next one or end."""
        self.rounds.close_round(aggregated=ok)
        accepted, self._accepted, self._agg = self._accepted, [], None
        self.policy.closed(ok)
        try:
            self._after_close(cur, ok, aggregate_s, accepted)
        except Exception:  # the round is closed whatever went wrong in its records: the run goes on
            log.exception("recording round %d failed; the run goes on", cur.index)
        self.advance(cur, ok)

    def aggregate(self) -> bool:
        """Replace the global model with the running aggregation's result; False if there is none or it failed."""
        if self._agg is None:
            return False
        try:
            self.global_state = self._agg.result()
        except FedPeftError as exc:
            log.error("aggregation failed: %s; the round counts as failed", exc)
            return False
        return True

    def _after_close(self, cur: OpenRound, ok: bool, aggregate_s: float, accepted: list[Accepted]) -> None:
        for acc in accepted:
            rank = self.shapes.rank(acc.device_id)  # the rank it trained at (before observe() may change it)
            shape: dict[str, Any] = {"rank": rank} if rank is not None else {}
            self.records.device(cur.index, cur.retry, cur.opened_at, acc.device_id, "accepted", None, acc=acc,
                                traffic_round=acc.round, **shape)
            self.divergence.device(cur.index, acc.device_id, acc.report)
            self._assigned(acc.device_id, self.shapes.observe(acc.device_id, acc.report.train_s,
                                                              self.args.round_timeout_s), cur.index)
        self.policy.missing(cur, accepted)
        eval_res = self._evaluate(cur.index, accepted) if ok else None
        self.divergence.global_eval(cur.index, eval_res)
        self.records.round(
            cur.index, cur.retry, ok, self.policy.recorded_selection(cur, accepted),
            len(accepted), dict(cur.dropped), self.clock.now() - cur.opened_at, aggregate_s, eval_res,
            self.rounds.online_count(),
            dropped_messages=self.drops.total, dropped_messages_coalesced=self.drops.coalesced,
        )
        self.traffic.forget(up_to_round=cur.index - self.policy.traffic_rounds_kept)
        if ok:
            self.admission.max_norm = self.norm_bound.observe(a.update_norm for a in accepted)
            self._checkpoint(cur.index)
        else:
            log.warning("round %d attempt %d closed with %d of %d required updates; retrying it", cur.index,
                        cur.retry, len(accepted), self.args.min_updates)
        self.runlog.sync()

    def advance(self, cur: OpenRound, ok: bool) -> None:
        """After `cur` closed: end the run if its policy or the retry limit says so, else open the next round."""
        if self.policy.ends_run(cur, ok):
            return
        if not ok and self.rounds.retry > self.args.max_round_retries:
            self.finish(f"round {cur.index} failed {self.rounds.retry} attempts (train_args.max_round_retries="
                        f"{self.args.max_round_retries}): fewer than train_args.min_updates="
                        f"{self.args.min_updates} updates arrived by the deadline each time; check the devices' "
                        "logs, raise round_timeout_s or lower min_updates")
            return
        self._maybe_open()
        if not self.finished and self.rounds.current is None and self.rounds.finished:
            self.finish()

    def _evaluate(self, round_idx: int, accepted: list[Accepted]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        res = None
        if self.evaluator.available and round_idx % self.args.eval_every == 0:
            res = self.evaluator.evaluate(self.global_state)
        if res is None:
            evals = [a.report.global_eval for a in accepted
                     if a.report.global_eval is not None and a.report.global_eval.samples > 0]
            if evals:
                n = sum(e.samples for e in evals)
                res = {"loss": sum(e.loss * e.samples for e in evals) / n,
                       "top1": sum(e.top1 * e.samples for e in evals) / n, "samples": n, "where": "devices"}
        if res is not None:
            res["eval_s"] = time.perf_counter() - t0
        return res

    def _checkpoint(self, round_idx: int) -> None:
        if round_idx % self.spec.checkpoint_every and round_idx != self.args.comm_round:
            return
        declared = {d: s.declared_samples for d, s in self.rounds.devices.items() if s.declared_samples > 0}
        self.checkpoints.save(round_idx, self.global_state, self.strategy.state_dict(),
                              {"cum_bytes": self.records.cum_bytes, "seed": self.spec.seed,
                               "norm_bound": self.norm_bound.state(), "declared_samples": declared})

    def finish(self, reason: str = "completed") -> None:
        """End the run: cancel the timers, tell every admitted device, write summary.json."""
        if self.finished:
            return
        self.finished, self.end_reason = True, reason
        self.timers.cancel_all()
        for device_id, dev in self.rounds.devices.items():
            if dev.accepted:
                self._out.append(Finish(receiver=device_id, reason=reason))
        self.runlog.sync()
        rounds = [RoundRecord.from_dict(r) for r in self.runlog.records(RoundRecord.KIND)]
        summary = build_summary(rounds, self.spec.manifest.num_params, self.spec.fingerprint)
        self.runlog.write_summary(dataclasses.replace(summary, end_reason=reason,
                                                      bytes_kind=self.spec.bytes_kind).to_dict())
        log.log(logging.INFO if reason == "completed" else logging.ERROR, "run %s finished after %d rounds: %s",
                self.spec.run_id, self.version, reason)
