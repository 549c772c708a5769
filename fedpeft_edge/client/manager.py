"""The device agent on the wire: FedML's comm manager around a DeviceAgent (join, rounds, finish)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fedpeft_edge.client.agent import DeviceAgent
from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import BudgetExhaustedError, FedPeftError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, transfer_seconds
from fedpeft_edge.transport import messages as M
from fedpeft_edge.transport.fedml import FedPeftCommManager, Message, guarded

log = logging.getLogger(__name__)

EXIT_FINISHED = 0
EXIT_REFUSED = 3


class DeviceManager(FedPeftCommManager):
    """Joins (again after every reconnect or server restart), trains each round it is sent, stops on FINISH."""

    def __init__(self, agent: DeviceAgent, comm_args: CommArgs, run_id: str) -> None:
        self.agent = agent
        self.meter = BandwidthMeter()
        self.exit_code = EXIT_FINISHED
        self.refusal: str | None = None
        self._server_online: bool | None = None
        self._server_session: Any = None
        self._last_reply: Any = None
        super().__init__(comm_args, run_id, agent.identity.device_id, meter=self.meter)

    def register_message_receive_handlers(self) -> None:
        handlers = {
            M.MSG_TYPE_CONNECTION_IS_READY: self._on_connected,
            M.MSG_TYPE_PRESENCE: self._on_presence,
            M.MSG_TYPE_S2C_JOIN_ACK: self._on_ack,
            M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT: self._on_sync,
            M.MSG_TYPE_S2C_FINISH: self._on_finish,
        }
        for msg_type, fn in handlers.items():
            self.register_message_receive_handler(msg_type, guarded(fn))

    def _to_server(self, msg_type: int) -> Any:
        return Message(msg_type, self.agent.identity.device_id, M.SERVER_ID)

    def _join(self) -> None:
        msg = self._to_server(M.MSG_TYPE_C2S_JOIN)
        for key, value in self.agent.join_params().items():
            msg.add_params(key, value)
        self.send_message(msg)

    def _on_connected(self, _msg: Any) -> None:
        # After a reconnect, announce again if the server is known to be up; at start-up wait for its
        # (retained) presence instead, so a device joins once.
        if self._server_online:
            self._join()

    def _on_presence(self, msg: Any) -> None:
        """Join whenever a new server session comes online (first sight, server restart, broker restart)."""
        if str(msg.get_sender_id()) != str(M.SERVER_ID):
            return
        online = msg.get(M.MSG_ARG_KEY_PRESENCE) == M.PRESENCE_ONLINE
        session = msg.get(M.MSG_ARG_KEY_PRESENCE_SINCE)
        if online and (self._server_online is not True or session != self._server_session):
            log.info("server is online: announcing %s", self.agent.identity.device_id)
            self._join()
        self._server_online = online
        self._server_session = session

    def _on_ack(self, msg: Any) -> None:
        if msg.get(M.MSG_ARG_KEY_ACCEPTED):
            log.info("joined the run")
            return
        self.refusal = str(msg.get(M.MSG_ARG_KEY_REASON))
        log.error("the server refused this device: %s", self.refusal)
        self.exit_code = EXIT_REFUSED
        self.finish()

    def _on_sync(self, msg: Any) -> None:
        round_idx = msg.get(M.MSG_ARG_KEY_ROUND)
        if not isinstance(round_idx, int):
            return
        if self._last_reply is not None and self._last_reply.get(M.MSG_ARG_KEY_ROUND) == round_idx:
            # The server asks again (it restarted, or our update was lost with the broker, or it arrived
            # while no round was open and was dropped as stale): resend the same update as a new message, since
            # the transport would drop a repeated msg_id unseen; the server counts a real repeat as duplicate.
            log.info("round %d asked again: resending the update", round_idx)
            self._last_reply.add_params(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
            self._last_reply.add_params(M.MSG_ARG_KEY_SENT_AT, time.time())
            self.com_manager.send_message(self._last_reply)
            return
        deadline = msg.get(M.MSG_ARG_KEY_DEADLINE)
        if isinstance(deadline, (int, float)) and time.time() > deadline:
            log.warning("round %d arrived after its deadline; skipping it", round_idx)
            return
        round_cfg = msg.get(M.MSG_ARG_KEY_CONFIG) or {}
        try:
            reply = self.agent.train_round(round_idx, msg.get(M.MSG_ARG_KEY_MODEL_PARAMS),
                                           msg.get(M.MSG_ARG_KEY_MANIFEST_HASH),
                                           evaluate_global=bool(round_cfg.get("evaluate")))
        except BudgetExhaustedError as exc:
            log.warning("%s: leaving later rounds", exc)
            self.agent.exhausted = True
            status = self._to_server(M.MSG_TYPE_C2S_CLIENT_STATUS)
            status.add_params(M.MSG_ARG_KEY_CLIENT_STATUS, "BUDGET_EXHAUSTED")
            status.add_params(M.MSG_ARG_KEY_ROUND, round_idx)
            status.add_params("epsilon", self.agent.epsilon())
            self.send_message(status)
            return
        except FedPeftError as exc:
            self._report_error(round_idx, exc)
            return
        except Exception as exc:  # a device failure goes back to the server; the agent keeps serving
            log.exception("round %d failed", round_idx)
            self._report_error(round_idx, exc)
            return
        reply.params["metrics"]["download_s"] = transfer_seconds(
            self.meter.transfers(round=round_idx), msg.get(M.MSG_ARG_KEY_SENT_AT))
        out = self._to_server(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER)
        for key, value in reply.params.items():
            out.add_params(key, value)
        out.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, reply.blob)
        out.add_params(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
        self._last_reply = out
        out.add_params(M.MSG_ARG_KEY_SENT_AT, time.time())
        rec = self.com_manager.send_message(out)
        self.meter.forget(up_to_round=round_idx - 1)
        log.info("round %d: sent %d bytes in %d packet(s), loss %.4f", round_idx, rec.mqtt_bytes, rec.chunks,
                 reply.params["metrics"]["train_loss"])

    def _report_error(self, round_idx: int, exc: BaseException) -> None:
        err = self._to_server(M.MSG_TYPE_C2S_ERROR)
        err.add_params(M.MSG_ARG_KEY_ROUND, round_idx)
        err.add_params(M.MSG_ARG_KEY_ERROR, f"{type(exc).__name__}: {exc}")
        self.send_message(err)

    def _on_finish(self, _msg: Any) -> None:
        log.info("the server finished the run")
        self.finish()
