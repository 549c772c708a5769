"""A device on the wire: FedML's comm manager around one DeviceLogic (join, rounds, finish).

The receive loop (`run()`, never paho's network thread) handles control messages itself and hands training to
`pool` (a bounded executor shared by the devices of a fleet), so a device that trains does not stop its own or
its neighbours' traffic. Without a pool (the simulator) training runs inline, in delivery order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from fedpeft_edge.client.logic import EXIT_FINISHED, EXIT_REFUSED, DeviceLogic, SyncAction
from fedpeft_edge.config import CommArgs
from fedpeft_edge.transport import messages as M
from fedpeft_edge.transport.fedml import FedPeftCommManager, guarded

log = logging.getLogger(__name__)

__all__ = ["EXIT_FINISHED", "EXIT_REFUSED", "DeviceManager"]


class DeviceManager(FedPeftCommManager):
    """Binds a DeviceLogic to a comm manager; `backend` selects MQTT (default) or transport.memory."""

    def __init__(self, logic: DeviceLogic, comm_args: CommArgs, run_id: str, pool: Executor | None = None,
                 backend: Callable[[str | int, Any], Any] | None = None) -> None:
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
        for msg_type in (M.MSG_TYPE_CONNECTION_IS_READY, M.MSG_TYPE_PRESENCE, M.MSG_TYPE_S2C_JOIN_ACK,
                         M.MSG_TYPE_S2C_FINISH):
            self.register_message_receive_handler(msg_type, guarded(self._on_control))
        self.register_message_receive_handler(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, guarded(self._on_sync))

    def _on_control(self, msg: Any) -> None:
        self._send_all(self.logic.handle_control(msg))
        if self.logic.finished:
            self.finish()

    def _on_sync(self, msg: Any) -> None:
        action, reply = self.logic.classify_sync(msg)
        if action is SyncAction.RESEND:
            self._send_all([reply])
        elif action is SyncAction.TRAIN:
            if self.pool is None:
                self._train(msg)
            else:
                self.pool.submit(self._train, msg)

    def _train(self, msg: Any) -> None:
        try:
            self._send_all(self.logic.train(msg))
        except Exception:  # a send that fails must not kill the worker; the server re-asks
            log.exception("%s: sending the round's reply failed", self.logic.device_id)

    def _send_all(self, messages: list[Any]) -> None:
        for out in messages:
            rec = self.com_manager.send_message(out)
            if out.get_type() == M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER:
                log.info("%s: round %s: sent %d bytes in %d packet(s)", self.logic.device_id,
                         out.get(M.MSG_ARG_KEY_ROUND), rec.mqtt_bytes, rec.chunks)
