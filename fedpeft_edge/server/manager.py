"""The round engine on the wire: FedML's comm manager around a RoundEngine, as client/manager.py is for a device.

The transport's adapter (FedPeftCommManager) hands it typed device messages (only the types a device may send on
its d2s channel); params that fail to parse are recorded as dropped (a malformed join is answered with a refusal
naming the field), never raised. Timers, presence and connection state arrive apart from the wire, as
local events (`on_local`), so no frame can fire a deadline or mark a device offline. The
engine's answers are sent in order; a failed send is logged and the round's deadline (armed before the
first task) closes the round without that device. All of it runs on the receive loop's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.protocol import (
    SERVER_ID,
    Channel,
    ConnectionReady,
    LocalEvent,
    ProtocolMessage,
    Timer,
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
        super().__init__(comm_args, run_id, SERVER_ID, (Channel.DEVICE_TO_SERVER,), meter=meter, backend=backend,
                         on_drop=self.drops)
        admit = getattr(self.com_manager, "set_admission", None)
        if admit is not None:  # chunked transfers only from admitted devices (bounded reassembly)
            admit(self._admitted)

    def _admitted(self, device_id: str) -> bool:
        dev = self.engine.rounds.devices.get(device_id)
        return dev is not None and dev.accepted

    def _post_timer(self, timer: Timer) -> None:
        self.post_local(timer)

    def on_message(self, message: ProtocolMessage) -> None:
        """A device's message (parsed for the d2s channel by the transport's adapter) goes to the engine."""
        self._answer(lambda: self.engine.handle(message), getattr(message, "sender", None))

    def on_invalid(self, params: dict[str, Any], error: ProtocolError) -> None:
        """Params that did not parse: a join is refused with the reason (the device can fix it), the rest
        recorded as dropped."""
        sender = sender_of(params)
        if params.get(MSG_ARG_KEY_TYPE) == MSG_TYPE_C2S_JOIN and sender is not None and sender != str(SERVER_ID):
            self._answer(lambda: self.engine.refuse_join(sender, str(error)), sender)
        else:
            self._answer(lambda: self.engine.dropped(sender, DropReason.INVALID, str(error)), sender)

    def on_local(self, event: LocalEvent) -> None:
        """A timer or a presence change (local events, never from a frame) goes to the engine."""
        if isinstance(event, ConnectionReady):
            log.info("server connected; waiting for %d devices", self.engine.args.min_devices)
            return
        self._answer(lambda: self.engine.handle(event), None)

    def _answer(self, handle: Callable[[], list[ProtocolMessage]], sender: str | None) -> None:
        try:
            out = handle()
        except Exception:  # nothing a peer (or a timer) causes may end the receive loop
            log.exception("handling a message from %s failed; dropped", sender)
            out = []
        self.send_all(out, interleave=True)
        if self.engine.finished:
            self.finish()

    def run_until_done(self) -> None:
        """Serve until the run ends (its run directory then holds summary.json)."""
        try:
            self.send_all(self.engine.start(), interleave=True)
            self.run()
        finally:
            self.timers.cancel_all()
            self.drops.flush()
            close = getattr(self.engine.runlog, "close", None)
            if close is not None:
                close()
