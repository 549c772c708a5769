"""Per-run MQTT topics: server->device, device->server, each node's retained presence, and the shared model."""

from __future__ import annotations

import dataclasses

from fedpeft_edge.errors import TransportError
from fedpeft_edge.protocol.keys import BROADCAST, MSG_TYPE_S2C_MODEL, SERVER_ID

_FORBIDDEN = ("/", "+", "#", "\x00")


def _check_level(what: str, value: str) -> str:
    if not value or any(c in value for c in _FORBIDDEN):
        raise TransportError(
            f"{what} {value!r} cannot be an MQTT topic level; "
            "use a non-empty name without '/', '+', '#' or NUL"
        )
    return value


@dataclasses.dataclass(frozen=True)
class Topics:
    """Topic names of one run: `{prefix}/{run_id}/{s2d|d2s|presence}/{node_id}`, and `{prefix}/{run_id}/model/0`
    (the server's shared model, comm_args.model_delivery "shared")."""

    prefix: str
    run_id: str

    def __post_init__(self) -> None:
        _check_level("topic prefix", self.prefix)
        _check_level("run id", self.run_id)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.run_id}"

    def s2d(self, device_id: str | int) -> str:
        """Server -> one device."""
        return f"{self.root}/s2d/{_check_level('device id', str(device_id))}"

    def d2s(self, device_id: str | int) -> str:
        """One device -> server."""
        return f"{self.root}/d2s/{_check_level('device id', str(device_id))}"

    def presence(self, node_id: str | int) -> str:
        """A node's retained presence ("ONLINE"; "OFFLINE" as its last will)."""
        return f"{self.root}/presence/{_check_level('node id', str(node_id))}"

    def model(self) -> str:
        """Server -> every device: a round's global model, once (comm_args.model_delivery "shared")."""
        return f"{self.root}/model/{SERVER_ID}"

    def all_d2s(self) -> str:
        """What the server subscribes to for updates."""
        return f"{self.root}/d2s/+"

    def all_presence(self) -> str:
        """What the server subscribes to for presence."""
        return f"{self.root}/presence/+"

    def route(self, sender: str | int, receiver: object, msg_type: object) -> tuple[str, str]:
        """(topic, peer) of a message `sender` sends to `receiver`: the server to one device or, for its shared
        model, to every device; a device only to the server. TransportError for any other receiver."""
        if str(sender) == str(SERVER_ID):
            if receiver == BROADCAST and msg_type == MSG_TYPE_S2C_MODEL:
                return self.model(), BROADCAST
            if receiver is None or str(receiver) == str(SERVER_ID):
                raise TransportError(f"server cannot send to receiver {receiver!r}; address a device id")
            return self.s2d(str(receiver)), str(receiver)
        if str(receiver) != str(SERVER_ID):
            raise TransportError(f"device {sender} can only send to the server ({SERVER_ID}), not to {receiver!r}")
        return self.d2s(sender), str(SERVER_ID)

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(kind, node_id) of one of this run's topics, or None for a foreign topic."""
        head = self.root + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or parts[0] not in ("s2d", "d2s", "presence", "model") or not parts[1]:
            return None
        return parts[0], parts[1]


def topic_node(topic: str) -> str:
    """The node a topic names (its last level, at most 64 characters): the sender of a d2s or presence packet."""
    return topic.rsplit("/", 1)[-1][:64] if isinstance(topic, str) else "?"
