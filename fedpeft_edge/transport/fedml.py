"""FedML's messaging contract (Message, Observer, BaseCommunicationManager, FedMLCommManager), loaded safely.

`import fedml.x` would run fedml/__init__.py (hundreds of modules; FedML's init function calls its cloud).
Instead the `fedml`, `fedml.core`, `fedml.core.mlops` and `fedml.cross_silo*` packages are pre-registered as empty
packages pointing into the installed wheel, so only the ~12 messaging modules load. Pinned to fedml==0.9.6.
This is the only module that imports fedml; it imports nothing of ours but errors (the comm manager that
binds FedML to a backend is transport/manager.py, so fedml.py and mqtt.py no longer import each other).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import TransportError

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


def message_of(params: dict[str, Any]) -> Any:
    """FedML's Message carrying a typed message's params (protocol's `to_params()`): the only place ours become
    FedML's, on their way to a backend."""
    message = Message()
    message.init_from_json_object(params)
    return message


def params_of(message: Any) -> Any:
    """The params of a received FedML Message (whatever a backend handed the observer; not checked here:
    protocol.parse checks them)."""
    return message.get_params() if hasattr(message, "get_params") else None
