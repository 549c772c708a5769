"""One device's side of the protocol, transport-free: a server message in, the device's replies out.

`DeviceLogic` holds no connection: a single agent, a fleet host and the simulator hand it the messages their
comm manager received and send what it returns. Training happens in `train()`, which the host may run on a
worker thread; `classify_sync()` is the quick decision taken on the receive loop's thread.

Liveness (#12.6): the device trains at most once per round (its privacy budget is spent per round). A repeated
sync for the round it already answered resends the stored reply, at most `train_args.resend_rate_per_round`
times; a sync for an older round, or for the round it is training right now, is ignored.

Shared model delivery (comm_args.model_delivery "shared"): a task may name the round's SharedModel instead of
carrying the tensors. The device keeps the latest shared model it received; a task whose model has not arrived
waits for it (`take_model`, `on_model`), and when the host's wait runs out (`model_missing`) the device joins
again, which makes the server re-send the task with the tensors in it.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
import uuid
from typing import Any

from fedpeft_edge.client.device import DeviceOwnState
from fedpeft_edge.client.runtime import SharedRuntime, TrainingSlot
from fedpeft_edge.data import align_labels
from fedpeft_edge.errors import BudgetExhaustedError, DataError, FedPeftError, ProtocolError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, transfer_seconds
from fedpeft_edge.protocol import (
    SERVER_ID,
    ClientStatus,
    ConnectionReady,
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
    Update,
)
from fedpeft_edge.protocol.keys import STATUS_BUDGET_EXHAUSTED, STATUS_ONLINE
from fedpeft_edge.wire.codec import decode_tensors, encode_update

log = logging.getLogger(__name__)

EXIT_FINISHED = 0
EXIT_REFUSED = 3

Reply = Update | DeviceErrorReport | ClientStatus


class SyncAction(enum.Enum):
    """What a device does with a round task."""

    TRAIN = "train"
    RESEND = "resend"
    IGNORE = "ignore"


class DeviceLogic:
    """Join, train each round once, resend on request (rate-limited), stop on FINISH."""

    def __init__(self, runtime: SharedRuntime, state: DeviceOwnState, meter: BandwidthMeter | None = None) -> None:
        self.runtime = runtime
        self.state = state
        self.meter = meter if meter is not None else BandwidthMeter()
        cfg = runtime.cfg
        self._train_args, self._comm = cfg.train_args, cfg.comm_args
        self._max_resends = cfg.train_args.resend_rate_per_round
        self._slowdown = cfg.device_args.slowdown_factor
        self._emulated_memory = cfg.device_args.emulate_memory_mb
        self.finished = False
        self.refusal: str | None = None
        self.exit_code = EXIT_FINISHED
        self._server_online: bool | None = None
        self._server_session: Any = None
        self._lock = threading.Lock()
        # Tasks are keyed (round, task_number): async tasks are numbered (one round index hands out several), sync
        # ones carry 0, so a retried attempt of an answered round asks for the same update again.
        self._training: tuple[int, int] | None = None  # the task being trained now
        self._last_task = (-1, 0)  # the last task this device trained (or failed) for
        self._last_reply: Reply | None = None
        self._resends = 0
        self._model: SharedModel | None = None  # the latest shared model received
        self._waiting: RoundTask | None = None  # a task to train once its shared model arrives

    @property
    def device_id(self) -> str:
        return self.state.identity.device_id

    # --- dispatch -------------------------------------------------------------------------------------------
    def handle(self, msg: ProtocolMessage | LocalEvent) -> list[ProtocolMessage]:
        """Every message inline (training included): the replies to send. The simulator's path."""
        if isinstance(msg, SharedModel):
            task = self.on_model(msg)
            return self.train(task) if task is not None else []
        if isinstance(msg, RoundTask):
            action, reply = self.classify_sync(msg)
            if action is SyncAction.TRAIN:
                ready = self.take_model(msg)
                return self.train(ready) if ready is not None else []
            return [reply] if reply is not None else []
        return self.handle_control(msg)

    def handle_control(self, msg: ProtocolMessage | LocalEvent) -> list[ProtocolMessage]:
        """Connection, presence, join-ack and finish: quick, on the receive loop's thread."""
        if isinstance(msg, ConnectionReady):
            # After a reconnect, announce again if the server is known to be up; at start-up wait for its
            # (retained) presence instead, so a device joins once.
            return [self.join()] if self._server_online else []
        if isinstance(msg, Presence):
            return self._on_presence(msg)
        if isinstance(msg, JoinAck):
            self._on_ack(msg)
        elif isinstance(msg, Finish):
            log.info("%s: the server finished the run", self.device_id)
            self.finished = True
        return []

    # --- join -----------------------------------------------------------------------------------------------
    def join(self) -> Join:
        """What the device announces at join (and again after every reconnect or server restart)."""
        rt, st = self.runtime, self.state
        return Join(
            sender=self.device_id, client_idx=st.identity.client_index, backbone_fingerprint=rt.fingerprint,
            manifest_hash=rt.manifest.hash, manifest=rt.manifest.to_json(), num_samples=st.num_samples,
            profile=self._profile(), data_stats=st.data.stats(), epsilon=st.epsilon(),
            client_status=STATUS_BUDGET_EXHAUSTED if st.exhausted else STATUS_ONLINE,
            class_names=tuple(st.data.class_names) or None,
        )

    def _profile(self) -> dict[str, Any]:
        """The runtime's measured profile; a study's emulated memory (device_args.emulate_memory_mb) replaces the
        RAM figure, marked as emulated."""
        emulated = self._emulated_memory
        if not emulated:
            return self.runtime.profile
        idx = self.state.identity.client_index or 0
        return {**self.runtime.profile, "ram_total_mb": emulated[idx % len(emulated)], "cuda_available": False,
                "memory_emulated": True}

    def _on_presence(self, msg: Presence) -> list[ProtocolMessage]:
        """Join whenever a new server session comes online (first sight, server restart, broker restart)."""
        if msg.node != str(SERVER_ID):
            return []
        out: list[ProtocolMessage] = []
        if msg.online and (self._server_online is not True or msg.since != self._server_session):
            log.info("server is online: announcing %s", self.device_id)
            out.append(self.join())
        self._server_online, self._server_session = msg.online, msg.since
        return out

    def _on_ack(self, msg: JoinAck) -> None:
        if msg.accepted and msg.class_names is not None:
            try:  # the run's label order: this device's classes are mapped to it by name
                self.state.data = align_labels(self.state.data, msg.class_names)
            except DataError as exc:
                msg = dataclasses.replace(msg, accepted=False, reason=str(exc))
        if msg.accepted:
            log.info("%s joined the run", self.device_id)
            return
        self.refusal = str(msg.reason)
        log.error("the server refused device %s: %s", self.device_id, self.refusal)
        self.exit_code = EXIT_REFUSED
        self.finished = True

    # --- rounds ---------------------------------------------------------------------------------------------
    def classify_sync(self, task: RoundTask) -> tuple[SyncAction, Reply | None]:
        """Decide (quickly, thread-safe) whether to train, resend the stored reply, or ignore this task."""
        key = _task_key(task)
        with self._lock:
            waiting = self._waiting
            if waiting is not None and _task_key(waiting) == key and not task.awaits_model:
                self._waiting = None  # the task re-sent with its tensors, while its shared model was still due
                return SyncAction.TRAIN, None
            if self._training == key or key < self._last_task:
                log.info("%s: task for round %d ignored (%s)", self.device_id, task.round,
                         "training it now" if self._training == key else f"trained {self._last_task[0]}")
                return SyncAction.IGNORE, None
            if key == self._last_task and self._last_reply is not None:
                return self._resend(task.round)
            if self._training is not None:
                return SyncAction.IGNORE, None
            if task.deadline is not None and time.time() > task.deadline:
                log.warning("%s: round %d arrived after its deadline; skipping it", self.device_id, task.round)
                return SyncAction.IGNORE, None
            self._training = key
            return SyncAction.TRAIN, None

    # --- shared model delivery ----------------------------------------------------------------------------
    def take_model(self, task: RoundTask) -> RoundTask | None:
        """The task classify_sync() said to train, with its tensors; None while its shared model is still due."""
        if not task.awaits_model:
            return task
        with self._lock:
            ready = self._with_model(task, self._model)
            if ready is None:
                self._waiting = task
            return ready

    def on_model(self, model: SharedModel) -> RoundTask | None:
        """Keep a shared model; the task that waited for it, now with its tensors, if there is one."""
        with self._lock:
            self._model = model
            waiting = self._waiting
            ready = self._with_model(waiting, model) if waiting is not None else None
            if ready is not None:
                self._waiting = None
            return ready

    def model_missing(self, round_idx: int | None, retry: int | None, task_number: int = 0) -> list[ProtocolMessage]:
        """The host's wait for a task's shared model ran out: give the task up and join again, so the server
        re-sends it with the tensors (a re-sent task always carries them)."""
        with self._lock:
            task = self._waiting
            if task is None or (task.round, task.retry, task.task_number) != (round_idx, retry, task_number):
                return []
            self._waiting, self._training = None, None
        log.warning("%s: the shared model %s of round %d did not arrive; asking for the task again",
                    self.device_id, task.model_id, task.round)
        return [self.join()]

    def _with_model(self, task: RoundTask, model: SharedModel | None) -> RoundTask | None:
        """`task` with `model`'s tensors if `model` is the one it names (caller holds the lock)."""
        if model is None or model.model_id != task.model_id:
            return None
        try:
            ready = task.with_model(model)
        except ProtocolError as exc:
            log.warning("%s: shared model refused: %s", self.device_id, exc)
            return None
        if task.mode == "sync":
            self._model = None  # one task per round uses it; an async device may get another task on it
        return ready

    def _resend(self, round_idx: int) -> tuple[SyncAction, Reply | None]:
        if self._resends >= self._max_resends or self._last_reply is None:
            log.warning("%s: round %d asked again; already resent %d times (train_args.resend_rate_per_round)"
                        ", ignoring", self.device_id, round_idx, self._resends)
            return SyncAction.IGNORE, None
        # The server asks again (it restarted, or the update was lost with the broker, or it arrived while no
        # round was open): the same reply as a new message, since the transport drops a repeated msg_id.
        self._resends += 1
        log.info("%s: round %d asked again: resending (%d/%d)", self.device_id, round_idx, self._resends,
                 self._max_resends)
        if isinstance(self._last_reply, Update):
            return SyncAction.RESEND, dataclasses.replace(self._last_reply, msg_id=uuid.uuid4().hex,
                                                          sent_at=time.time())
        return SyncAction.RESEND, self._last_reply

    def train(self, task: RoundTask) -> list[ProtocolMessage]:
        """Train the round classify_sync() said to train; the reply (update, error or budget status)."""
        reply: Reply
        try:
            reply = self._train_round(task)
        except BudgetExhaustedError as exc:
            log.warning("%s: %s: leaving later rounds", self.device_id, exc)
            self.state.exhausted = True
            reply = ClientStatus(sender=self.device_id, status=STATUS_BUDGET_EXHAUSTED, round=task.round,
                                 epsilon=self.state.epsilon())
        except Exception as exc:  # a device failure goes back to the server; the device keeps serving
            if not isinstance(exc, FedPeftError):
                log.exception("%s: round %d failed", self.device_id, task.round)
            reply = DeviceErrorReport(sender=self.device_id, round=task.round, error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._training = None
            self._last_task, self._last_reply, self._resends = _task_key(task), reply, 0
        self.meter.forget(up_to_round=task.round - 1)
        return [reply]

    def _train_round(self, task: RoundTask) -> Update:
        st, rt = self.state, self.runtime
        if st.exhausted:
            raise BudgetExhaustedError(f"device {self.device_id} has spent its privacy budget")
        if st.privatizer is not None:
            st.privatizer.check_budget()  # refuse before training, not after spending budget on it
        if task.manifest_hash != rt.manifest.hash:
            raise ProtocolError(
                f"server sent tensors for manifest {task.manifest_hash[:12]}, this device runs "
                f"{rt.manifest.hash[:12]} ({rt.manifest.method}); run the agent with the server's config")
        t0 = time.perf_counter()
        # Shared with the received payload, not copied: activate() copies it into the model, send_delta reads it.
        global_state = decode_tensors(task.blob, rt.manifest, rt.manifest.hash, self._comm.max_update_bytes,
                                      copy=False)
        layout = rt.layout(task.rank)  # a per-device rank (LoRA flexlora): train from and send its part only
        if layout is not None:
            global_state = layout.start(global_state)
        with rt.activate(st, peft=global_state) as slot:
            report = self._train_window(task, slot, t0)
        local = st.peft  # the window's one copy out: the device's new state, and (read only) what it sends
        if self._train_args.send_delta:
            local = {k: v - global_state[k] for k, v in local.items()}
        t_enc = time.perf_counter()
        manifest = layout.manifest if layout is not None else rt.manifest
        if layout is not None:
            local = layout.narrow(local)
        # never written in place: activate() replaces st.peft by a fresh copy, so views of it can be sent as they are
        blob = encode_update(local, manifest, self._comm.encoding)
        encode_s = time.perf_counter() - t_enc
        epsilon = float(st.privatizer.end_round(task.round)) if st.privatizer is not None else None
        download_s = transfer_seconds(self.meter.transfers(round=task.round), task.sent_at)
        report = dataclasses.replace(report, encode_s=encode_s, epsilon=epsilon, download_s=download_s)
        log.info("%s: round %d trained, loss %s", self.device_id, task.round, report.train_loss)
        return Update(
            sender=self.device_id, round=task.round, num_samples=st.num_samples, blob=blob, report=report,
            manifest_hash=manifest.hash, encoding=self._comm.encoding, is_delta=self._train_args.send_delta,
            model_version=task.model_version, msg_id=uuid.uuid4().hex, sent_at=time.time(),
        )

    def _train_window(self, task: RoundTask, slot: TrainingSlot, t0: float) -> DeviceReport:
        """Inside activate() (which set the global tensors, decoded since t0): train and report; activate()
        copies the trained tensors out when the window closes."""
        rt, st = self.runtime, self.state
        t_loaded = time.perf_counter()
        global_eval = rt.evaluate(st) if task.evaluate else None
        cpu0 = time.thread_time()
        with rt.monitor.measure() as meas:
            result = slot.trainer.train(epochs=self._train_args.epochs, max_steps=self._train_args.max_steps)
        train_cpu_s = time.thread_time() - cpu0
        if self._slowdown > 1.0:  # tests only: a slow device
            time.sleep((self._slowdown - 1.0) * (time.perf_counter() - t_loaded))
        resources = dict(meas.summary())
        # Per device: this device's training window on its worker thread, and its own state's bytes. Shared:
        # the frozen backbone every device of this process uses (counted once, not per device).
        resources["device"] = {"train_thread_cpu_s": train_cpu_s, "state_bytes": st.nbytes(),
                               "shared_backbone_bytes": rt.shared_bytes(), "scope": "per-device window"}
        report = DeviceReport(
            train_loss=result.loss, train_loss_end=result.loss_end, train_acc=result.accuracy, steps=result.steps,
            samples_seen=result.samples,
            train_s=result.wall_s, set_state_s=t_loaded - t0,
            images_per_s=result.samples / result.wall_s if result.wall_s > 0 else None,
            resources=resources, global_eval=global_eval,
        )
        return report


def _task_key(task: RoundTask) -> tuple[int, int]:
    """What tells one task from another: the round and the task's number (0 for every sync task)."""
    return task.round, task.task_number
