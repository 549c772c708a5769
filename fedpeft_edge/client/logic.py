"""One device's side of the protocol, transport-free: a server message in, the device's replies out.

`DeviceLogic` holds no connection: a single agent, a fleet host and the simulator hand it the messages their
comm manager received and send what it returns. Training happens in `train()`, which the host may run on a
worker thread; `classify_sync()` is the quick decision taken on the receive loop's thread.

Liveness (#12.6): the device trains at most once per round (its privacy budget is spent per round). A repeated
sync for the round it already answered resends the stored reply, at most `device_args.max_resends_per_round`
times; a sync for an older round, or for the round it is training right now, is ignored.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from typing import Any

from fedpeft_edge.client.device import DeviceState
from fedpeft_edge.client.runtime import SharedRuntime
from fedpeft_edge.errors import BudgetExhaustedError, FedPeftError, ProtocolError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, transfer_seconds
from fedpeft_edge.transport import messages as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors

log = logging.getLogger(__name__)

EXIT_FINISHED = 0
EXIT_REFUSED = 3


class SyncAction(enum.Enum):
    """What a device does with a sync (round task) message."""

    TRAIN = "train"
    RESEND = "resend"
    IGNORE = "ignore"


class DeviceLogic:
    """Join, train each round once, resend on request (rate-limited), stop on FINISH."""

    def __init__(self, runtime: SharedRuntime, state: DeviceState, meter: BandwidthMeter | None = None) -> None:
        self.runtime = runtime
        self.state = state
        self.meter = meter if meter is not None else BandwidthMeter()
        cfg = runtime.cfg
        self._train_args, self._comm = cfg.train_args, cfg.comm_args
        self._max_resends = cfg.device_args.max_resends_per_round
        self.finished = False
        self.refusal: str | None = None
        self.exit_code = EXIT_FINISHED
        self._server_online: bool | None = None
        self._server_session: Any = None
        self._lock = threading.Lock()
        self._training: int | None = None  # the round being trained now
        self._last_round = 0  # the last round this device trained (or failed) for
        self._last_reply: Any = None
        self._resends = 0

    @property
    def device_id(self) -> str:
        return self.state.identity.device_id

    def _to_server(self, msg_type: int) -> Any:
        return Message(msg_type, self.device_id, M.SERVER_ID)

    # --- dispatch -------------------------------------------------------------------------------------------
    def handle(self, msg: Any) -> list[Any]:
        """Every message inline (training included): the replies to send. The simulator calls this."""
        if msg.get_type() == M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT:
            action, reply = self.classify_sync(msg)
            if action is SyncAction.TRAIN:
                return self.train(msg)
            return [reply] if reply is not None else []
        return self.handle_control(msg)

    def handle_control(self, msg: Any) -> list[Any]:
        """Connection, presence, join-ack and finish: quick, on the receive loop's thread."""
        kind = msg.get_type()
        if kind == M.MSG_TYPE_CONNECTION_IS_READY:
            # After a reconnect, announce again if the server is known to be up; at start-up wait for its
            # (retained) presence instead, so a device joins once.
            return [self.join_message()] if self._server_online else []
        if kind == M.MSG_TYPE_PRESENCE:
            return self._on_presence(msg)
        if kind == M.MSG_TYPE_S2C_JOIN_ACK:
            self._on_ack(msg)
        elif kind == M.MSG_TYPE_S2C_FINISH:
            log.info("%s: the server finished the run", self.device_id)
            self.finished = True
        return []

    # --- join -----------------------------------------------------------------------------------------------
    def join_message(self) -> Any:
        """What the device announces at join (and again after every reconnect or server restart)."""
        rt, st = self.runtime, self.state
        params = {
            "device_id": self.device_id,
            M.MSG_ARG_KEY_CLIENT_INDEX: st.identity.client_index,
            M.MSG_ARG_KEY_BACKBONE_FINGERPRINT: rt.fingerprint,
            M.MSG_ARG_KEY_MANIFEST_HASH: rt.manifest.hash,
            M.MSG_ARG_KEY_MANIFEST: rt.manifest.to_json(),
            M.MSG_ARG_KEY_NUM_SAMPLES: st.num_samples,
            M.MSG_ARG_KEY_PROFILE: rt.profile,
            M.MSG_ARG_KEY_DATA_STATS: st.data.stats(),
            "epsilon": st.epsilon(),
            M.MSG_ARG_KEY_CLIENT_STATUS: "BUDGET_EXHAUSTED" if st.exhausted else "ONLINE",
        }
        msg = self._to_server(M.MSG_TYPE_C2S_JOIN)
        for key, value in params.items():
            msg.add_params(key, value)
        return msg

    def _on_presence(self, msg: Any) -> list[Any]:
        """Join whenever a new server session comes online (first sight, server restart, broker restart)."""
        if str(msg.get_sender_id()) != str(M.SERVER_ID):
            return []
        online = msg.get(M.MSG_ARG_KEY_PRESENCE) == M.PRESENCE_ONLINE
        session = msg.get(M.MSG_ARG_KEY_PRESENCE_SINCE)
        out = []
        if online and (self._server_online is not True or session != self._server_session):
            log.info("server is online: announcing %s", self.device_id)
            out.append(self.join_message())
        self._server_online, self._server_session = online, session
        return out

    def _on_ack(self, msg: Any) -> None:
        if msg.get(M.MSG_ARG_KEY_ACCEPTED):
            log.info("%s joined the run", self.device_id)
            return
        self.refusal = str(msg.get(M.MSG_ARG_KEY_REASON))
        log.error("the server refused device %s: %s", self.device_id, self.refusal)
        self.exit_code = EXIT_REFUSED
        self.finished = True

    # --- rounds ---------------------------------------------------------------------------------------------
    def classify_sync(self, msg: Any) -> tuple[SyncAction, Any]:
        """Decide (quickly, thread-safe) whether to train, resend the stored reply, or ignore this sync."""
        round_idx = msg.get(M.MSG_ARG_KEY_ROUND)
        if not isinstance(round_idx, int) or isinstance(round_idx, bool) or round_idx < 0:
            log.warning("%s: sync with round %r dropped (not a round index)", self.device_id, round_idx)
            return SyncAction.IGNORE, None
        with self._lock:
            if self._training == round_idx or round_idx < self._last_round:
                log.info("%s: sync for round %d ignored (%s)", self.device_id, round_idx,
                         "training it now" if self._training == round_idx else f"trained {self._last_round}")
                return SyncAction.IGNORE, None
            if round_idx == self._last_round and self._last_reply is not None:
                return self._resend(round_idx)
            if round_idx == self._last_round or self._training is not None:
                return SyncAction.IGNORE, None
            deadline = msg.get(M.MSG_ARG_KEY_DEADLINE)
            if isinstance(deadline, (int, float)) and time.time() > deadline:
                log.warning("%s: round %d arrived after its deadline; skipping it", self.device_id, round_idx)
                return SyncAction.IGNORE, None
            self._training = round_idx
            return SyncAction.TRAIN, None

    def _resend(self, round_idx: int) -> tuple[SyncAction, Any]:
        if self._resends >= self._max_resends:
            log.warning("%s: round %d asked again; already resent %d times (device_args.max_resends_per_round)"
                        ", ignoring", self.device_id, round_idx, self._resends)
            return SyncAction.IGNORE, None
        # The server asks again (it restarted, or the update was lost with the broker, or it arrived while no
        # round was open): the same update as a new message, since the transport drops a repeated msg_id.
        self._resends += 1
        log.info("%s: round %d asked again: resending the update (%d/%d)", self.device_id, round_idx,
                 self._resends, self._max_resends)
        again = Message()
        again.init_from_json_object(dict(self._last_reply.get_params()))  # the blob is shared, not copied
        again.add_params(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
        again.add_params(M.MSG_ARG_KEY_SENT_AT, time.time())
        return SyncAction.RESEND, again

    def train(self, msg: Any) -> list[Any]:
        """Train the round classify_sync() said to train; the reply (update, error or budget status)."""
        round_idx = int(msg.get(M.MSG_ARG_KEY_ROUND))
        try:
            reply = self._train_round(round_idx, msg)
        except BudgetExhaustedError as exc:
            log.warning("%s: %s: leaving later rounds", self.device_id, exc)
            self.state.exhausted = True
            reply = self._to_server(M.MSG_TYPE_C2S_CLIENT_STATUS)
            reply.add_params(M.MSG_ARG_KEY_CLIENT_STATUS, "BUDGET_EXHAUSTED")
            reply.add_params(M.MSG_ARG_KEY_ROUND, round_idx)
            reply.add_params("epsilon", self.state.epsilon())
        except Exception as exc:  # a device failure goes back to the server; the device keeps serving
            if not isinstance(exc, FedPeftError):
                log.exception("%s: round %d failed", self.device_id, round_idx)
            reply = self._to_server(M.MSG_TYPE_C2S_ERROR)
            reply.add_params(M.MSG_ARG_KEY_ROUND, round_idx)
            reply.add_params(M.MSG_ARG_KEY_ERROR, f"{type(exc).__name__}: {exc}")
        reply.add_params(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
        reply.add_params(M.MSG_ARG_KEY_SENT_AT, time.time())
        with self._lock:
            self._training = None
            self._last_round, self._last_reply, self._resends = round_idx, reply, 0
        self.meter.forget(up_to_round=round_idx - 1)
        return [reply]

    def _train_round(self, round_idx: int, msg: Any) -> Any:
        st, rt = self.state, self.runtime
        if st.exhausted:
            raise BudgetExhaustedError(f"device {self.device_id} has spent its privacy budget")
        if st.privatizer is not None:
            st.privatizer.check_budget()  # refuse before training, not after spending budget on it
        manifest_hash = msg.get(M.MSG_ARG_KEY_MANIFEST_HASH)
        if manifest_hash is not None and manifest_hash != rt.manifest.hash:
            raise ProtocolError(
                f"server sent tensors for manifest {str(manifest_hash)[:12]}, this device runs "
                f"{rt.manifest.hash[:12]} ({rt.manifest.method}); run the agent with the server's config")
        round_cfg = msg.get(M.MSG_ARG_KEY_CONFIG) or {}
        with rt.activate(st):
            metrics, local = self._train_window(msg, bool(round_cfg.get("evaluate")))
        t_enc = time.perf_counter()
        blob = encode_tensors(local, rt.manifest, self._comm.encoding)
        metrics["encode_s"] = time.perf_counter() - t_enc
        metrics["epsilon"] = float(st.privatizer.end_round(round_idx)) if st.privatizer is not None else None
        metrics["download_s"] = transfer_seconds(self.meter.transfers(round=round_idx),
                                                 msg.get(M.MSG_ARG_KEY_SENT_AT))
        out = self._to_server(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER)
        for key, value in {M.MSG_ARG_KEY_ROUND: round_idx, M.MSG_ARG_KEY_NUM_SAMPLES: st.num_samples,
                           M.MSG_ARG_KEY_MANIFEST_HASH: rt.manifest.hash, M.MSG_ARG_KEY_ENCODING: self._comm.encoding,
                           "is_delta": self._train_args.send_delta, M.MSG_ARG_KEY_METRICS: metrics}.items():
            out.add_params(key, value)
        out.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, blob)
        log.info("%s: round %d trained, loss %.4f", self.device_id, round_idx, metrics["train_loss"])
        return out

    def _train_window(self, msg: Any, evaluate_global: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Inside activate(): set the global tensors, train, read the local tensors back."""
        rt, st = self.runtime, self.state
        t0 = time.perf_counter()
        global_state = decode_tensors(msg.get(M.MSG_ARG_KEY_MODEL_PARAMS), rt.manifest, rt.manifest.hash,
                                      self._comm.max_update_bytes, copy=True)
        rt.load_peft(st, global_state)
        t_loaded = time.perf_counter()
        global_eval = rt.evaluate(st) if evaluate_global else None
        cpu0 = time.thread_time()
        with rt.monitor.measure() as meas:
            result = rt.trainer.train(epochs=self._train_args.epochs, max_steps=self._train_args.max_steps)
        train_cpu_s = time.thread_time() - cpu0
        local = rt.current_peft()
        if self._train_args.send_delta:
            local = {k: v - global_state[k] for k, v in local.items()}
        resources = dict(meas.summary())
        # Per device: this device's training window on its worker thread, and its own state's bytes. Shared:
        # the frozen backbone every device of this process uses (counted once, not per device).
        resources["device"] = {"train_thread_cpu_s": train_cpu_s, "state_bytes": st.nbytes(),
                               "shared_backbone_bytes": rt.shared_bytes(), "scope": "per-device window"}
        metrics = {
            "train_loss": result.loss, "train_acc": result.accuracy, "steps": result.steps,
            "samples_seen": result.samples, "train_s": result.wall_s, "set_state_s": t_loaded - t0,
            "images_per_s": result.samples / result.wall_s if result.wall_s > 0 else None,
            "resources": resources, "global_eval": global_eval,
        }
        return metrics, local
