"""The transport's encryption layer: a node's Sealer seals every outgoing message's blob to its receiver and
opens the blobs sealed to it (wire/seal.py), bound to the message's header fields; built from comm_args."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import AuthError, ConfigError
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.wire.seal import (
    Buffer,
    blob_aad,
    is_sealed_blob,
    load_encryption_private_key,
    load_encryption_public_key,
    load_peer_encryption_keys,
    open_blob,
    seal_blob,
)


def encryption_on(comm_args: CommArgs) -> bool:
    """comm_args.encrypt, or where it is null: on in a provisioned node (signatures required, an X25519 key set)."""
    a = comm_args
    return a.encrypt if a.encrypt is not None else bool(a.require_signatures and a.encryption_key_file)


class Sealer:
    """One node's end of the encryption: seals outgoing blobs to their receiver (or, for the server's shared
    model, to every device it holds a key for) and opens the blobs sealed to it, bound to their headers."""

    def __init__(self, node_id: str, key: X25519PrivateKey, peers: Mapping[str, X25519PublicKey],
                 run_id: str, broadcast: str) -> None:
        self.node_id, self._key, self._peers = node_id, key, dict(peers)
        self.run_id, self._broadcast = run_id, broadcast

    def aad(self, params: Mapping[str, Any]) -> bytes:
        return blob_aad(self.run_id, params.get(M.MSG_ARG_KEY_TYPE), params.get(M.MSG_ARG_KEY_SENDER),
                        params.get(M.MSG_ARG_KEY_RECEIVER), params.get(M.MSG_ARG_KEY_ROUND),
                        params.get(M.MSG_ARG_KEY_MSG_ID))

    def seal(self, params: Mapping[str, Any], blob: Buffer) -> bytes:
        """`blob` sealed to the message's receiver (params name it); ConfigError if we hold no key for it."""
        receiver = str(params.get(M.MSG_ARG_KEY_RECEIVER))
        if receiver == self._broadcast:
            return seal_blob(blob, self.aad(params), recipients=self._peers)
        pub = self._peers.get(receiver)
        if pub is None:
            raise ConfigError(f"no X25519 public key for node {receiver!r} to encrypt to; provision it "
                              "(comm_args.peer_encryption_keys_dir / server_encryption_key_file) or set "
                              "comm_args.encrypt: false")
        return seal_blob(blob, self.aad(params), receiver=(receiver, pub))

    def open(self, params: Mapping[str, Any], blob: Buffer) -> bytes:
        """The plaintext of a blob sealed to this node under these params; AuthError (`unencrypted`,
        `undecryptable`) otherwise."""
        if not is_sealed_blob(blob):
            raise AuthError(f"a message from {str(params.get(M.MSG_ARG_KEY_SENDER))[:40]!r} carries tensors in "
                            "plaintext where encryption is on (comm_args.encrypt)", DropReason.UNENCRYPTED)
        shared = str(params.get(M.MSG_ARG_KEY_RECEIVER)) == self._broadcast
        return open_blob(blob, self.aad(params), self.node_id, self._key, shared=shared)


def build_sealer(comm_args: CommArgs, node_id: str | int, run_id: str) -> Sealer | None:
    """This node's Sealer where encryption is on (None where off); ConfigError naming the missing key file."""
    if not encryption_on(comm_args):
        return None
    a, server = comm_args, str(node_id) == str(M.SERVER_ID)
    peer_file = a.peer_encryption_keys_dir if server else a.server_encryption_key_file
    if not a.encryption_key_file or not peer_file:
        need = "peer_encryption_keys_dir" if server else "server_encryption_key_file"
        raise ConfigError(f"comm_args.encrypt is on but encryption_key_file or {need} is not set; re-provision "
                          "(`fedpeft-edge provision`, or `--rotate DEVICE` for one device) or set encrypt: false")
    peers = (load_peer_encryption_keys(peer_file) if server
             else {str(M.SERVER_ID): load_encryption_public_key(peer_file)})
    return Sealer(str(node_id), load_encryption_private_key(a.encryption_key_file), peers, run_id, M.BROADCAST)
