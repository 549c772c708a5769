"""The device agent on the wire: FedML's comm manager around a DeviceAgent (join, rounds, finish)."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fedpeft_edge.client.agent import DeviceAgent
from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import BudgetExhaustedError, FedPeftError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, transfer_seconds
from fedpeft_edge.protocol import (
    SERVER_ID,
    ClientStatus,
    ConnectionReady,
    DeviceErrorReport,
    Finish,
    JoinAck,
    Presence,
    ProtocolMessage,
    RoundTask,
    Update,
    parse,
)
from fedpeft_edge.protocol.keys import STATUS_BUDGET_EXHAUSTED
from fedpeft_edge.transport.manager import FedPeftCommManager, guarded

log = logging.getLogger(__name__)

EXIT_FINISHED = 0
EXIT_REFUSED = 3


class DeviceManager(FedPeftCommManager):
    """Joins (again after every reconnect or server restart), trains each round it is sent, stops on FINISH."""

    def __init__(self, agent: DeviceAgent, comm_args: CommArgs, run_id: str, resend_limit: int = 3) -> None:
        self.agent = agent
        self.meter = BandwidthMeter()
        self.exit_code = EXIT_FINISHED
        self.refusal: str | None = None
        self._server_online: bool | None = None
        self._server_session: Any = None
        self._last_reply: Update | None = None
        self._resends = 0
        self._task_no = -1
        self._resend_round: int | None = None
        self._max_resends = resend_limit
        super().__init__(comm_args, run_id, agent.identity.device_id, meter=self.meter)

    def register_message_receive_handlers(self) -> None:
        self._typed: dict[type[ProtocolMessage], Callable[[Any], None]] = {
            ConnectionReady: self._on_connected,
            Presence: self._on_presence,
            JoinAck: self._on_ack,
            RoundTask: self._on_sync,
            Finish: self._on_finish,
        }
        for cls in self._typed:
            self.register_message_receive_handler(cls.msg_type, guarded(self._dispatch))

    def _dispatch(self, msg: Any) -> None:
        """Parse (every field checked; a bad message raises ProtocolError, logged and dropped) and handle."""
        typed = parse(msg)
        handler = self._typed.get(type(typed))
        if handler is not None:
            handler(typed)

    def _send(self, typed: ProtocolMessage) -> Any:
        return self.com_manager.send_message(typed.to_message())

    def _join(self) -> None:
        self._send(self.agent.join())

    def _on_connected(self, _msg: ConnectionReady) -> None:
        # After a reconnect, announce again if the server is known to be up; at start-up wait for its
        # (retained) presence instead, so a device joins once.
        if self._server_online:
            self._join()

    def _on_presence(self, msg: Presence) -> None:
        """Join whenever a new server session comes online (first sight, server restart, broker restart)."""
        if msg.node != str(SERVER_ID):
            return
        if msg.online and (self._server_online is not True or msg.since != self._server_session):
            log.info("server is online: announcing %s", self.agent.identity.device_id)
            self._join()
        self._server_online = msg.online
        self._server_session = msg.since

    def _on_ack(self, msg: JoinAck) -> None:
        if msg.accepted:
            log.info("joined the run")
            return
        self.refusal = str(msg.reason)
        log.error("the server refused this device: %s", self.refusal)
        self.exit_code = EXIT_REFUSED
        self.finish()

    def _on_sync(self, task: RoundTask) -> None:
        last = self._last_reply
        # A repeated task (same round; in async mode also the same task number) asks for the update again.
        if last is not None and last.round == task.round and (task.mode == "sync" or task.attempt == self._task_no):
            self._resend(last)
            return
        self._task_no = task.attempt
        if task.deadline is not None and time.time() > task.deadline:
            log.warning("round %d arrived after its deadline; skipping it", task.round)
            return
        try:
            reply = self.agent.train_round(task)
        except BudgetExhaustedError as exc:
            log.warning("%s: leaving later rounds", exc)
            self.agent.exhausted = True
            self._send(ClientStatus(sender=self.agent.identity.device_id, status=STATUS_BUDGET_EXHAUSTED,
                                    round=task.round, epsilon=self.agent.epsilon()))
            return
        except FedPeftError as exc:
            self._report_error(task.round, exc)
            return
        except Exception as exc:  # a device failure goes back to the server; the agent keeps serving
            log.exception("round %d failed", task.round)
            self._report_error(task.round, exc)
            return
        download_s = transfer_seconds(self.meter.transfers(round=task.round), task.sent_at)
        out = dataclasses.replace(reply, report=reply.report.with_download_s(download_s),
                                  msg_id=uuid.uuid4().hex, sent_at=time.time())
        self._last_reply = out
        rec = self._send(out)
        self.meter.forget(up_to_round=task.round - 1)
        log.info("round %d: sent %d bytes in %d packet(s), loss %s", task.round, rec.mqtt_bytes, rec.chunks,
                 out.report.train_loss)

    def _resend(self, last: Update) -> None:
        """The server asks again (it restarted, or our update was lost with the broker, or it arrived while no
        round was open and was dropped as stale): resend the same update as a new message, since the transport
        would drop a repeated msg_id unseen; the server counts a real repeat as duplicate. Bounded per round, so
        forged round tasks cannot make the device upload without end."""
        if self._resends >= self._max_resends and self._resend_round == last.round:
            log.warning("round %d asked again more than %d times; not resending", last.round, self._max_resends)
            return
        self._resends = self._resends + 1 if self._resend_round == last.round else 1
        self._resend_round = last.round
        log.info("round %d asked again: resending the update", last.round)
        self._last_reply = dataclasses.replace(last, msg_id=uuid.uuid4().hex, sent_at=time.time())
        self._send(self._last_reply)

    def _report_error(self, round_idx: int, exc: BaseException) -> None:
        self._send(DeviceErrorReport(sender=self.agent.identity.device_id, round=round_idx,
                                     error=f"{type(exc).__name__}: {exc}"))

    def _on_finish(self, _msg: Finish) -> None:
        log.info("the server finished the run")
        self.finish()
