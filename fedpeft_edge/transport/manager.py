"""FedPeftCommManager: FedML's comm manager on one of our backends (MQTT by default); nodes subclass it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedpeft_edge.errors import FedPeftError, ProtocolError
from fedpeft_edge.transport.fedml import FedMLCommManager

if TYPE_CHECKING:
    from fedpeft_edge.config import CommArgs
    from fedpeft_edge.metering.bandwidth import BandwidthMeter
    from fedpeft_edge.protocol.events import LocalEvent
    from fedpeft_edge.transport.drops import DroppedMessage

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
    """FedML's comm manager on our MQTT backend; server and device managers subclass it.

    Subclasses implement `register_message_receive_handlers()` with `register_message_receive_handler(type,
    fn)` for wire messages and `on_local(event)` for local events (timers, connection state, presence), which
    the transport hands over typed and apart from the wire; `run()` blocks in the receive loop and dispatches on
    the calling thread; `finish()` stops it and disconnects (publishing OFFLINE presence).
    """

    def __init__(
        self,
        comm_args: CommArgs,
        run_id: str,
        node_id: str | int,
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
        self.node_id = node_id  # before FedML's __init__, which calls _init_manager()
        rank = node_id if isinstance(node_id, int) else 0
        super().__init__(args=None, comm=None, rank=rank, size=0, backend="MQTT_FEDPEFT")

    def _init_manager(self) -> None:
        self.com_manager = self._backend(self._comm_args, self._run_id, self.node_id, self._meter,
                                         self._connect_timeout_s, self._on_drop)
        self.com_manager.add_observer(self)

    def get_sender_id(self) -> str | int:
        return self.node_id

    def receive_message(self, msg_type: Any, msg_params: Any) -> None:
        """Dispatch to the registered handler; an unregistered type is a protocol error, logged, dropped."""
        handler = self.message_handler_dict.get(msg_type)
        if handler is None:
            log.warning("%s", ProtocolError(
                f"no handler for message type {msg_type!r} from {msg_params.get_sender_id()!r}; dropped "
                "(register it in register_message_receive_handlers)"))
            return
        handler(msg_params)

    def receive_local(self, event: LocalEvent) -> None:
        """A local event from the transport (never from a frame): handed to `on_local`."""
        self.on_local(event)

    def on_local(self, event: LocalEvent) -> None:
        """Handle a local event; subclasses override (the default ignores it)."""

    def post_local(self, event: LocalEvent) -> None:
        """Enqueue a local event to ourselves (timers, deadlines), dispatched on the receive loop's thread."""
        self.com_manager.post_local(event)

    def finish(self) -> None:
        """Stop the receive loop and disconnect (publishing OFFLINE presence)."""
        self.com_manager.stop_receive_message()
        self.com_manager.close()


def guarded(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a message handler so a bad message is logged and dropped instead of ending the receive loop."""

    def handle(msg: Any) -> None:
        try:
            handler(msg)
        except FedPeftError as exc:
            log.warning("dropped message %s from %s: %s", msg.get_type(), msg.get_sender_id(), exc)
        except Exception:
            log.exception("handler for message %s from %s failed", msg.get_type(), msg.get_sender_id())

    return handle
