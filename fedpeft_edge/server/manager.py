"""The round engine on the wire: FedML's comm manager around a RoundEngine, as client/manager.py is for a device.

Every received FedML Message is parsed into a typed device message (protocol/: only the types a device may send
on its d2s channel); a message that fails to parse is recorded as dropped (a malformed join is answered with a
refusal naming the field), never raised. Timers, presence and connection state arrive apart from the wire, as
local events (`on_local`), so no frame can fire a deadline or mark a device offline. The
engine's answers are sent one by one; a failed send is logged and the round's deadline (armed before the
first task) closes the round without that device. All of it runs on the receive loop's thread.
"""

from __future__ import annotations

import logging
from typing import Any

from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import FedPeftError, ProtocolError
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.protocol import (
    MESSAGE_CLASSES,
    SERVER_ID,
    Channel,
    ConnectionReady,
    LocalEvent,
    ProtocolMessage,
    Timer,
    parse,
    sender_of,
)
from fedpeft_edge.protocol.keys import MSG_ARG_KEY_TYPE, MSG_TYPE_C2S_JOIN
from fedpeft_edge.server.engine import RoundEngine
from fedpeft_edge.server.ports import ThreadTimers
from fedpeft_edge.transport.manager import BackendFactory, FedPeftCommManager

log = logging.getLogger(__name__)


class ServerManager(FedPeftCommManager):
    """Feeds a RoundEngine the transport's messages and timers, and sends what it returns."""

    def __init__(self, engine: RoundEngine, timers: ThreadTimers, comm_args: CommArgs, run_id: str,
                 meter: BandwidthMeter, backend: BackendFactory | None = None) -> None:
        self.engine = engine
        self.timers = timers
        self.meter = meter
        timers.bind(self._post_timer)
        self.drops = engine.drops  # receive-path drops go to the engine's record: one coalesced `dropped_message` log
        super().__init__(comm_args, run_id, SERVER_ID, meter=meter, backend=backend, on_drop=self.drops)
        admit = getattr(self.com_manager, "set_admission", None)
        if admit is not None:  # chunked transfers only from admitted devices (bounded reassembly)
            admit(self._admitted)

    def _admitted(self, device_id: str) -> bool:
        dev = self.engine.rounds.devices.get(device_id)
        return dev is not None and dev.accepted

    def register_message_receive_handlers(self) -> None:
        for msg_type in MESSAGE_CLASSES:
            self.register_message_receive_handler(msg_type, self.on_message)

    def receive_message(self, msg_type: Any, msg_params: Any) -> None:
        """Every message goes through parse(), whatever its msg_type (an unknown or unhashable one is dropped)."""
        self.on_message(msg_params)

    def _post_timer(self, timer: Timer) -> None:
        self.post_local(timer)

    def on_message(self, msg: Any) -> None:
        try:
            out = self._handle(msg)
        except Exception:  # nothing a peer sends may end the receive loop
            log.exception("handling a message from %s failed; dropped", sender_of(msg))
            out = []
        self._answer(out)

    def on_local(self, event: LocalEvent) -> None:
        """A timer or a presence change (local events, never from a frame) goes to the engine."""
        if isinstance(event, ConnectionReady):
            log.info("server connected; waiting for %d devices", self.engine.args.min_devices)
            return
        try:
            out = self.engine.handle(event)
        except Exception:  # a bug in a timer's handling must not end the receive loop either
            log.exception("handling local event %s failed", event)
            out = []
        self._answer(out)

    def _answer(self, out: list[ProtocolMessage]) -> None:
        self.send_all(out)
        if self.engine.finished:
            self.finish()

    def _handle(self, msg: Any) -> list[ProtocolMessage]:
        try:
            typed = parse(msg, Channel.DEVICE_TO_SERVER)
        except ProtocolError as exc:
            sender = sender_of(msg)
            params = msg.get_params() if hasattr(msg, "get_params") else {}
            is_join = isinstance(params, dict) and params.get(MSG_ARG_KEY_TYPE) == MSG_TYPE_C2S_JOIN
            if is_join and sender is not None and sender != str(SERVER_ID):
                return self.engine.refuse_join(sender, str(exc))
            return self.engine.dropped(sender, "invalid", str(exc))
        return self.engine.handle(typed)

    def send_all(self, out: list[ProtocolMessage]) -> None:
        send_many = getattr(self.com_manager, "send_messages", None)  # MQTT: a round's tasks interleaved
        if send_many is not None and len(out) > 1:
            try:
                results = send_many([m.to_message() for m in out])
            except FedPeftError as exc:  # one message could not even be framed: send them one by one
                log.debug("interleaved send failed (%s); sending one by one", exc)
            else:
                for m, result in zip(out, results, strict=True):
                    if isinstance(result, FedPeftError):
                        log.warning("could not send %s to %s: %s", type(m).__name__, getattr(m, "receiver", "?"),
                                    result)
                return
        for m in out:
            try:
                self.com_manager.send_message(m.to_message())
            except FedPeftError as exc:
                log.warning("could not send %s to %s: %s", type(m).__name__, getattr(m, "receiver", "?"), exc)

    def run_until_done(self) -> None:
        """Serve until the run ends (its run directory then holds summary.json)."""
        try:
            self.send_all(self.engine.start())
            self.run()
        finally:
            self.timers.cancel_all()
            self.drops.flush()
            close = getattr(self.engine.runlog, "close", None)
            if close is not None:
                close()
