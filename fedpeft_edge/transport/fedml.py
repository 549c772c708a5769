"""FedML's messaging contract (Message, Observer, BaseCommunicationManager, FedMLCommManager), loaded safely.

`import fedml.x` would run fedml/__init__.py (hundreds of modules; FedML's init function calls its cloud).
Instead the `fedml`, `fedml.core`, `fedml.core.mlops` and `fedml.cross_silo*` packages are pre-registered as empty
packages pointing into the installed wheel, so only the ~12 messaging modules load. Pinned to fedml==0.9.6.
This is the only module that imports fedml.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft_edge.errors import FedPeftError, ProtocolError, TransportError

if TYPE_CHECKING:
    from fedpeft_edge.config import CommArgs
    from fedpeft_edge.metering.bandwidth import BandwidthMeter

log = logging.getLogger(__name__)

_EMPTY_PACKAGES = ("fedml", "fedml.core", "fedml.core.mlops", "fedml.cross_silo", "fedml.cross_silo.client",
                   "fedml.cross_silo.server")


def _fedml_root() -> Path:
    spec = importlib.util.find_spec("fedml") if "fedml" not in sys.modules else sys.modules["fedml"].__spec__
    if spec is None or not spec.submodule_search_locations:
        raise TransportError("fedml is not installed; pip install --no-deps fedml==0.9.6")
    return Path(list(spec.submodule_search_locations)[0])


def _preregister() -> None:
    """Register FedML's heavy packages as empty packages (a no-op if the real fedml is already loaded)."""
    if "fedml" in sys.modules and getattr(sys.modules["fedml"], "__version__", None):
        return  # the real fedml was imported by someone else: use it as it is
    root = _fedml_root()
    for name in _EMPTY_PACKAGES:
        if name in sys.modules:
            continue
        path = root.joinpath(*name.split(".")[1:])
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(path)]
        module = importlib.util.module_from_spec(spec)
        module.__path__ = [str(path)]
        sys.modules[name] = module


def _load() -> tuple[Any, Any, Any, Any, Any]:
    _preregister()
    try:
        message = importlib.import_module("fedml.core.distributed.communication.message")
        observer = importlib.import_module("fedml.core.distributed.communication.observer")
        base = importlib.import_module("fedml.core.distributed.communication.base_com_manager")
        comm = importlib.import_module("fedml.core.distributed.fedml_comm_manager")
        defs = importlib.import_module("fedml.cross_silo.client.message_define")
    except ImportError as exc:
        raise TransportError(
            f"cannot import FedML's messaging modules ({exc}); install fedml==0.9.6 with --no-deps "
            "plus requests, certifi and cachetools"
        ) from exc
    return (message.Message, observer.Observer, base.BaseCommunicationManager, comm.FedMLCommManager,
            defs.MyMessage)


Message, Observer, BaseCommunicationManager, FedMLCommManager, FedMLMyMessage = _load()


class FedPeftCommManager(FedMLCommManager):  # type: ignore[misc, valid-type]
    """FedML's comm manager on our MQTT backend; server and device managers subclass it.

    Subclasses implement `register_message_receive_handlers()` with `register_message_receive_handler(type,
    fn)`; `run()` blocks in the receive loop and dispatches on the calling thread; `finish()` stops it and
    disconnects (publishing OFFLINE presence). `backend` swaps MQTT for another BaseCommunicationManager
    (transport.memory, for the simulator).
    """

    def __init__(
        self,
        comm_args: CommArgs,
        run_id: str,
        node_id: str | int,
        meter: BandwidthMeter | None = None,
        connect_timeout_s: float = 10.0,
        backend: Callable[[str | int, BandwidthMeter | None], Any] | None = None,
    ) -> None:
        self._comm_args = comm_args
        self._backend = backend  # (node_id, meter) -> a BaseCommunicationManager; None = MQTT
        self._run_id = run_id
        self._meter = meter
        self._connect_timeout_s = connect_timeout_s
        self.node_id = node_id  # before FedML's __init__, which calls _init_manager()
        rank = node_id if isinstance(node_id, int) else 0
        super().__init__(args=None, comm=None, rank=rank, size=0, backend="MQTT_FEDPEFT")

    def _init_manager(self) -> None:
        if self._backend is not None:  # e.g. transport.memory for an in-process simulation
            self.com_manager = self._backend(self.node_id, self._meter)
            self.com_manager.add_observer(self)
            return
        from fedpeft_edge.transport.mqtt import MqttCommManager

        self.com_manager = MqttCommManager(
            self._comm_args, self._run_id, self.node_id, meter=self._meter,
            connect_timeout_s=self._connect_timeout_s,
        )
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

    def post_local(self, message: Any) -> None:
        """Enqueue a message to ourselves (timers, deadlines), dispatched on the receive loop's thread."""
        self.com_manager.post_local(message)

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
