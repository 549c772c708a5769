"""A device on the wire: FedML's comm manager around one DeviceLogic (join, rounds, finish).

The receive loop (`run()`, never paho's network thread) parses each message (protocol.parse checks every
field), handles control messages itself and hands training to `pool` (a bounded executor shared by the devices
of a fleet), so a device that trains does not stop its own or its neighbours' traffic. Without a pool (the
simulator) training runs inline, in delivery order.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from typing import Any

from fedpeft_edge.client.logic import EXIT_FINISHED, EXIT_REFUSED, DeviceLogic, SyncAction
from fedpeft_edge.config import CommArgs
from fedpeft_edge.protocol import ConnectionReady, Finish, JoinAck, Presence, ProtocolMessage, RoundTask, Update, parse
from fedpeft_edge.transport.manager import BackendFactory, FedPeftCommManager, guarded

log = logging.getLogger(__name__)

__all__ = ["EXIT_FINISHED", "EXIT_REFUSED", "DeviceManager"]


class DeviceManager(FedPeftCommManager):
    """Binds a DeviceLogic to a comm manager; `backend` selects MQTT (default) or transport.memory."""

    def __init__(self, logic: DeviceLogic, comm_args: CommArgs, run_id: str, pool: Executor | None = None,
                 backend: BackendFactory | None = None) -> None:
        self.logic = logic
        self.pool = pool
        super().__init__(comm_args, run_id, logic.device_id, meter=logic.meter, backend=backend)
        self.register_message_receive_handlers()

    @property
    def exit_code(self) -> int:
        return self.logic.exit_code

    @property
    def refusal(self) -> str | None:
        return self.logic.refusal

    def register_message_receive_handlers(self) -> None:
        for cls in (ConnectionReady, Presence, JoinAck, Finish, RoundTask):
            self.register_message_receive_handler(cls.msg_type, guarded(self._dispatch))

    def _dispatch(self, msg: Any) -> None:
        """Parse (a bad message raises ProtocolError: logged and dropped by `guarded`) and handle."""
        typed = parse(msg)
        if isinstance(typed, RoundTask):
            self._on_task(typed)
            return
        self._send_all(self.logic.handle_control(typed))
        if self.logic.finished:
            self.finish()

    def _on_task(self, task: RoundTask) -> None:
        action, reply = self.logic.classify_sync(task)
        if action is SyncAction.RESEND and reply is not None:
            self._send_all([reply])
        elif action is SyncAction.TRAIN:
            if self.pool is None:
                self._train(task)
            else:
                self.pool.submit(self._train, task)

    def _train(self, task: RoundTask) -> None:
        if self.logic.finished:  # the run ended while this task waited for a worker
            return
        try:
            replies = self.logic.train(task)
            if not self.logic.finished:  # after FINISH the connection is closed: nothing to send on
                self._send_all(replies)
        except Exception:  # a send that fails must not kill the worker; the server asks again
            log.exception("%s: sending the round's reply failed", self.logic.device_id)
        finally:
            self.logic.runtime.release_heap()  # the window's freed buffers, once the update is on its way

    def _send_all(self, messages: list[ProtocolMessage]) -> None:
        for out in messages:
            rec = self.com_manager.send_message(out.to_message())
            if isinstance(out, Update):
                log.info("%s: round %d: sent %d bytes in %d packet(s)", self.logic.device_id, out.round,
                         rec.mqtt_bytes, rec.chunks)
