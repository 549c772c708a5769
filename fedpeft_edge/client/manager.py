"""A device on the wire: FedML's comm manager around one DeviceLogic (join, rounds, finish).

The receive loop (`run()`, never paho's network thread) parses each message (protocol.parse checks every
field), handles control messages itself and hands training to `pool` (a bounded executor shared by the devices
of a fleet), so a device that trains does not stop its own or its neighbours' traffic. Without a pool (the
simulator) training runs inline, in delivery order. A task that names a shared model not received yet waits
for it on a timer (comm_args.publish_timeout_s plus the model's bytes at min_link_rate_bps, at most half the
time left to the deadline); when it fires, the device asks for the task again (DeviceLogic.model_missing).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor

from fedpeft_edge.client.logic import EXIT_FINISHED, EXIT_REFUSED, DeviceLogic, SyncAction
from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import FedPeftError
from fedpeft_edge.protocol import (
    Channel,
    LocalEvent,
    ProtocolMessage,
    RoundTask,
    SharedModel,
    Timer,
    Update,
)
from fedpeft_edge.transport.framing import ack_timeout_s
from fedpeft_edge.transport.manager import BackendFactory, FedPeftCommManager
from fedpeft_edge.wire.limits import receive_limits

log = logging.getLogger(__name__)

__all__ = ["EXIT_FINISHED", "EXIT_REFUSED", "DeviceManager"]

MODEL_WAIT = "model_wait"


class DeviceManager(FedPeftCommManager):
    """Binds a DeviceLogic to a comm manager; `backend` selects MQTT (default) or transport.memory."""

    def __init__(self, logic: DeviceLogic, comm_args: CommArgs, run_id: str, pool: Executor | None = None,
                 backend: BackendFactory | None = None) -> None:
        self.logic = logic
        self.pool = pool
        comm_args = receive_limits(comm_args, logic.runtime.manifest)  # bounds from the manifest, not gigabytes
        self._comm = comm_args
        super().__init__(comm_args, run_id, logic.device_id, (Channel.SERVER_TO_DEVICE, Channel.MODEL),
                         meter=logic.meter, backend=backend)

    @property
    def exit_code(self) -> int:
        return self.logic.exit_code

    @property
    def refusal(self) -> str | None:
        return self.logic.refusal

    def on_message(self, message: ProtocolMessage) -> None:
        """A server message (parsed for the s2d channel or the model topic by the transport's adapter)."""
        try:
            self._dispatch(message)
        except FedPeftError as exc:
            log.warning("%s: dropped %s: %s", self.logic.device_id, type(message).__name__, exc)

    def on_local(self, event: LocalEvent) -> None:
        """Connection state, the server's presence and our own model-wait timer (never from a frame)."""
        try:
            if isinstance(event, Timer):
                if event.name == MODEL_WAIT and event.node == self.logic.device_id:
                    self._send_all(self.logic.model_missing(event.round, event.retry, event.task_number or 0))
                return
            self._send_all(self.logic.handle_control(event))
            if self.logic.finished:
                self.finish()
        except Exception:
            log.exception("%s: handling local event %s failed", self.logic.device_id, event)

    def _dispatch(self, typed: ProtocolMessage) -> None:
        if isinstance(typed, RoundTask):
            self._on_task(typed)
            return
        if isinstance(typed, SharedModel):
            ready = self.logic.on_model(typed)
            if ready is not None:
                self._start(ready)
            return
        self._send_all(self.logic.handle_control(typed))
        if self.logic.finished:
            self.finish()

    def _on_task(self, task: RoundTask) -> None:
        action, reply = self.logic.classify_sync(task)
        if action is SyncAction.RESEND and reply is not None:
            self._send_all([reply])
        elif action is SyncAction.TRAIN:
            ready = self.logic.take_model(task)
            if ready is not None:
                self._start(ready)
            else:
                self._wait_for_model(task)

    def _start(self, task: RoundTask) -> None:
        if self.pool is None:
            self._train(task)
        else:
            self.pool.submit(self._train, task)

    def _wait_for_model(self, task: RoundTask) -> None:
        wait = ack_timeout_s(self._comm, task.model_bytes or 0)
        if task.deadline is not None:
            wait = min(wait, max(1.0, (task.deadline - time.time()) / 2))
        log.info("%s: round %d waits up to %.1f s for shared model %s", self.logic.device_id, task.round, wait,
                 task.model_id)
        timer = Timer(name=MODEL_WAIT, round=task.round, retry=task.retry, task_number=task.task_number,
                      node=self.logic.device_id)
        t = threading.Timer(wait, self.post_local, args=(timer,))
        t.daemon = True
        t.start()

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
        for out, rec in zip(messages, self.send_all(messages), strict=True):
            if isinstance(out, Update) and not isinstance(rec, FedPeftError):
                log.info("%s: round %d: sent %d bytes in %d packet(s)", self.logic.device_id, out.round,
                         rec.mqtt_bytes, rec.chunks)
