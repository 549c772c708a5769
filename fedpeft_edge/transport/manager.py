"""FedPeftCommManager: FedML's comm manager on one of our backends (MQTT by default), typed at its edge.

It is the one adapter between FedML's `Message` and our protocol: a received Message is parsed into the typed
message its sender may send on this node's inbound channels (`protocol.parse`) and handed to `on_message`;
params that do not parse go to `on_invalid`; local events (timers, connection state, presence) come typed from
the backend to `on_local`; `send_all` turns typed messages into FedML Messages for the backend. Nodes
(server/manager.py, client/manager.py) subclass it and never see a FedML Message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fedpeft_edge.errors import FedPeftError, ProtocolError
from fedpeft_edge.protocol import Channel, ProtocolMessage, parse, sender_of
from fedpeft_edge.protocol.keys import MSG_ARG_KEY_TYPE
from fedpeft_edge.protocol.roles import WIRE_TYPES
from fedpeft_edge.transport.fedml import FedMLCommManager, message_of, params_of

if TYPE_CHECKING:
    from fedpeft_edge.config import CommArgs
    from fedpeft_edge.drops import DroppedMessage
    from fedpeft_edge.metering.bandwidth import BandwidthMeter, TransferRecord
    from fedpeft_edge.protocol.events import LocalEvent

log = logging.getLogger(__name__)

# Builds the BaseCommunicationManager a node talks through: (comm_args, run_id, node_id, meter,
# connect_timeout_s, on_drop) -> backend. The default is the MQTT backend; simulation passes an in-memory one.
BackendFactory = Callable[..., Any]


def mqtt_backend(comm_args: CommArgs, run_id: str, node_id: str | int, meter: BandwidthMeter | None,
                 connect_timeout_s: float, on_drop: Callable[[DroppedMessage], None] | None = None) -> Any:
    from fedpeft_edge.transport.mqtt import MqttCommManager

    return MqttCommManager(comm_args, run_id, node_id, meter=meter, connect_timeout_s=connect_timeout_s,
                           on_drop=on_drop)


class FedPeftCommManager(FedMLCommManager):  # type: ignore[misc, valid-type]
    """FedML's comm manager on our backend, typed: subclasses implement `on_message(typed)`, `on_invalid(params,
    error)` and `on_local(event)`, and send with `send_all(messages)`.

    `inbound` names the channels this node receives on (the server: d2s; a device: s2d and the model topic):
    a message parses only to a type whose sender may send it on one of them. `run()` blocks in the receive loop
    and dispatches on the calling thread; `finish()` stops it and disconnects (publishing OFFLINE presence).
    """

    def __init__(
        self,
        comm_args: CommArgs,
        run_id: str,
        node_id: str | int,
        inbound: Sequence[Channel],
        meter: BandwidthMeter | None = None,
        connect_timeout_s: float = 10.0,
        backend: BackendFactory | None = None,
        on_drop: Callable[[DroppedMessage], None] | None = None,
    ) -> None:
        self._backend = backend or mqtt_backend
        self._on_drop = on_drop  # receive-path drops (malformed, forged, over a bound): recorded, never raised
        self._comm_args = comm_args
        self._run_id = run_id
        self._meter = meter
        self._connect_timeout_s = connect_timeout_s
        self._inbound = tuple(inbound)
        self.node_id = node_id  # before FedML's __init__, which calls _init_manager()
        rank = node_id if isinstance(node_id, int) else 0
        super().__init__(args=None, comm=None, rank=rank, size=0, backend="MQTT_FEDPEFT")

    def _init_manager(self) -> None:
        self.com_manager = self._backend(self._comm_args, self._run_id, self.node_id, self._meter,
                                         self._connect_timeout_s, self._on_drop)
        self.com_manager.add_observer(self)

    def get_sender_id(self) -> str | int:
        return self.node_id

    def register_message_receive_handlers(self) -> None:
        """No per-type handlers: every message is parsed and typed in `receive_message`."""

    def receive_message(self, msg_type: Any, msg_params: Any) -> None:
        """FedML's observer entry: parse the Message's params for this node's inbound channels, then dispatch."""
        params = params_of(msg_params)
        try:
            typed = parse(params, self._channel_for(params))
        except ProtocolError as exc:
            self.on_invalid(params if isinstance(params, dict) else {}, exc)
            return
        self.on_message(typed)

    def _channel_for(self, params: Any) -> Channel:
        msg_type = params.get(MSG_ARG_KEY_TYPE) if isinstance(params, dict) else None
        for channel in self._inbound:
            if isinstance(msg_type, int) and not isinstance(msg_type, bool) and msg_type in WIRE_TYPES[channel]:
                return channel
        return self._inbound[0]  # parse refuses it, naming what this channel takes

    def on_message(self, message: ProtocolMessage) -> None:
        """A typed message its sender may send this node; subclasses override."""

    def on_invalid(self, params: dict[str, Any], error: ProtocolError) -> None:
        """Params that did not parse (malformed, or a type its sender may not send here): logged and dropped."""
        log.warning("dropped a message from %s: %s", sender_of(params), error)

    def receive_local(self, event: LocalEvent) -> None:
        """A local event from the transport (never from a frame): handed to `on_local`."""
        self.on_local(event)

    def on_local(self, event: LocalEvent) -> None:
        """Handle a local event; subclasses override (the default ignores it)."""

    def post_local(self, event: LocalEvent) -> None:
        """Enqueue a local event to ourselves (timers, deadlines), dispatched on the receive loop's thread."""
        self.com_manager.post_local(event)

    def send_all(self, messages: Sequence[ProtocolMessage],
                 interleave: bool = False) -> list[TransferRecord | FedPeftError]:
        """Send in order, one after the other, or with `interleave` (a round's tasks to many devices) side by side
        where the backend can; a message that could not be sent is logged and its error returned in its place,
        never raised (the round's deadline copes)."""
        if not messages:
            return []
        frames = [message_of(m.to_params()) for m in messages]
        send_many = getattr(self.com_manager, "send_messages", None)  # MQTT: packets of many messages interleaved
        results: list[TransferRecord | FedPeftError] | None = None
        if interleave and send_many is not None and len(frames) > 1:
            try:
                results = send_many(frames)
            except FedPeftError as exc:  # one message could not even be framed: send them one by one
                log.debug("interleaved send failed (%s); sending one by one", exc)
        if results is None:
            results = []
            for frame in frames:
                try:
                    results.append(self.com_manager.send_message(frame))
                except FedPeftError as exc:
                    results.append(exc)
        for m, result in zip(messages, results, strict=True):
            if isinstance(result, FedPeftError):
                log.warning("could not send %s to %s: %s", type(m).__name__, getattr(m, "receiver", "?"), result)
        return results

    def finish(self) -> None:
        """Stop the receive loop and disconnect (publishing OFFLINE presence)."""
        self.com_manager.stop_receive_message()
        self.com_manager.close()
