"""The signing layer of a link: sign what this node sends (frames and chunk manifests), verify what it receives with
the key of the sender its topic names and against the replay window, and recognise a message id seen before.

It holds no connection: the MQTT comm manager calls it on the way out and on its receive thread on the way in,
and it is tested alone (tests/unit/transport/test_signing.py).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import AuthError, ConfigError
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.wire.auth import (
    Signer,
    Verifier,
    is_sealed,
    load_peer_keys,
    load_private_key,
    load_public_key,
)
from fedpeft_edge.wire.chunk import ChunkManifest

Buffer = bytes | bytearray | memoryview

DEDUP_WINDOW = 4096  # message ids remembered per node (QoS 1 redelivery, replays inside the signature window)


def build_auth(comm_args: CommArgs, is_server: bool) -> tuple[Signer | None, Verifier | None]:
    """This node's signer and its peers' verifier from comm_args (None where not configured)."""
    a = comm_args
    signer = Signer(load_private_key(a.signing_key_file)) if a.signing_key_file else None
    keys = {}
    if is_server and a.peer_keys_dir:
        keys = load_peer_keys(a.peer_keys_dir)
    elif not is_server and a.server_public_key_file:
        keys = {str(M.SERVER_ID): load_public_key(a.server_public_key_file)}
    if a.require_signatures and not keys:
        raise ConfigError(
            "comm_args.require_signatures is on but no peer public key was loaded; set "
            + ("peer_keys_dir to provisioning's keys/ directory" if is_server else "server_public_key_file")
        )
    return signer, (Verifier(keys, a.replay_window_s, journal=a.replay_journal_file) if keys else None)


class Signing:
    """Sign on send; verify (the topic's sender's key, the replay window) on receive."""

    def __init__(self, signer: Signer | None, verifier: Verifier | None, require: bool) -> None:
        self.signer, self.verifier, self.require = signer, verifier, require

    def seal(self, topic: str, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """The frame's parts with the signature envelope in front (unchanged where this node does not sign)."""
        if self.signer is None:
            return parts
        return [self.signer.envelope(topic, parts), *parts]

    def seal_manifests(self, topic: str, manifests: Sequence[ChunkManifest]) -> list[bytes]:
        """One signed packet per manifest part (this node must sign)."""
        if self.signer is None:
            raise ConfigError("chunk manifests are signed: this node has no comm_args.signing_key_file")
        signer = self.signer
        return [signer.envelope(topic, [body]) + body for body in (m.encode() for m in manifests)]

    def open(self, node: str, topic: str, payload: Buffer, replay: bool = True) -> memoryview:
        """The frame of a payload: a signed one verified (and checked against replay), an unsigned one only
        when comm_args.require_signatures is off; AuthError with its reason otherwise."""
        if is_sealed(payload):
            if self.verifier is None:
                raise AuthError(f"signed message from {node!r} but this node has no peer keys "
                                "(comm_args.peer_keys_dir / server_public_key_file)", DropReason.UNKNOWN_SENDER)
            return self.verifier.open(node, topic, payload, replay=replay)
        if self.require:
            raise AuthError(f"unsigned message from {node!r} on {topic} (comm_args.require_signatures)",
                            DropReason.UNSIGNED)
        return memoryview(payload)

    def check_chunk_sender(self, node: str) -> None:
        """Where signatures are required, a chunk from a sender without a public key is refused before reassembly."""
        if self.require and (self.verifier is None or not self.verifier.knows(node)):
            raise AuthError(f"chunk from {node!r}, a sender without a public key; refused before reassembly",
                            DropReason.UNKNOWN_SENDER)


class MessageIds:
    """The last `window` (sender, message id) pairs: a message arriving twice is refused the second time."""

    def __init__(self, window: int = DEDUP_WINDOW) -> None:
        self.window = window
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def check_new(self, node: str, msg_id: object) -> None:
        """Remember (node, msg_id); AuthError "duplicate" if it was seen within the window."""
        key = (node, str(msg_id))
        if key in self._seen:
            raise AuthError(f"message {msg_id} from {node} arrived before (QoS 1 redelivery or replay)",
                            DropReason.DUPLICATE)
        self._seen[key] = None
        while len(self._seen) > self.window:
            self._seen.popitem(last=False)
