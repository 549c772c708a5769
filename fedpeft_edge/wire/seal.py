"""End-to-end encryption of a message's blob (its tensors) between a device and the server: X25519 + HKDF-SHA256
+ ChaCha20-Poly1305, so a broker, or anyone holding only broker credentials, reads no tensor.

Sealed blob (little-endian):
`FPE1 | ver u8 | 0 u8 | n u16 | ephemeral X25519 public key (32) | nonce (12) | n x recipient | ciphertext | tag (16)`,
recipient = `len(id) u8 | id | wrapped content key (32 + 16)`.

Each sealed blob has its own ephemeral X25519 key; its agreement with a recipient's static key, through HKDF
(salt: both public keys; info: the recipient's id), gives a key used once.
- n = 0, one receiver (a task, an update): that derived key encrypts the blob directly (68 bytes of overhead).
- n >= 1, many receivers (the shared model): a fresh random content key encrypts the blob once; each
  recipient's derived key wraps it (about 50 bytes per device), so the model is never encrypted n times.
A derived key encrypts exactly one thing, so the wrap's fixed nonce never repeats under a key; the blob's nonce
is random. The AAD binds the message's signed header fields (run, type, sender, receiver, round, message id):
a ciphertext moved under another header does not open. The sender signs the frame holding the ciphertext
(wire/auth.py), and the receiver verifies that signature before it decrypts anything.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import AuthError
from fedpeft_edge.wire.auth import load_key, load_key_dir

SEAL_MAGIC = b"FPE1"
VERSION = 1
_HEAD = struct.Struct("<4sBBH32s12s")  # 52 bytes
_TAG = 16
_WRAPPED = 32 + _TAG
_WRAP_NONCE = bytes(12)  # the wrap key is used once (fresh ephemeral per blob): a fixed nonce never repeats
_INFO = b"fedpeft-e2e/1"
SEAL_OVERHEAD = _HEAD.size + _TAG  # a one-receiver blob's extra bytes (68)
MAX_WRAPS_BYTES = 256 * 1024  # a shared blob's recipient list: about 5,000 devices with 4-character ids

Buffer = bytes | bytearray | memoryview


def is_sealed_blob(blob: Buffer) -> bool:
    return bytes(memoryview(blob)[:4]) == SEAL_MAGIC


def sealed_nbytes(nbytes: int, recipients: Mapping[str, Any] | None = None) -> int:
    """Size of a sealed blob of `nbytes` plaintext bytes (recipients None: one receiver, no wrapped keys)."""
    wraps = sum(1 + len(r.encode()) + _WRAPPED for r in recipients) if recipients else 0
    return nbytes + SEAL_OVERHEAD + wraps


def blob_aad(run_id: str, msg_type: Any, sender: Any, receiver: Any, round_: Any, msg_id: Any) -> bytes:
    """The header fields a sealed blob is bound to (the signed frame carries them in the clear)."""
    return json.dumps(["fedpeft-e2e/1", str(run_id), str(msg_type), str(sender), str(receiver),
                       round_ if isinstance(round_, int) else None, str(msg_id)],
                      separators=(",", ":")).encode("utf-8")


def _derive(shared: bytes, eph_pub: bytes, recipient_pub: bytes, recipient: str) -> bytes:
    if shared == bytes(32):  # a low-order public key: no secret agreed
        raise ValueError("X25519 agreement gave the all-zero secret")
    return HKDF(hashes.SHA256(), 32, salt=eph_pub + recipient_pub,
                info=_INFO + b"|" + recipient.encode("utf-8")).derive(shared)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal_blob(blob: Buffer, aad: bytes, receiver: tuple[str, X25519PublicKey] | None = None,
              recipients: Mapping[str, X25519PublicKey] | None = None) -> bytes:
    """Encrypt `blob` for one `receiver` (id, public key) or for every one of `recipients` (wrapped key each)."""
    if (receiver is None) == (recipients is None):
        raise ValueError("seal_blob takes a receiver or recipients, not both or neither")
    eph = X25519PrivateKey.generate()
    eph_pub, nonce = _raw(eph.public_key()), os.urandom(12)
    wraps: list[bytes] = []
    if receiver is not None:
        rid, rpub = receiver
        key = _derive(eph.exchange(rpub), eph_pub, _raw(rpub), rid)
    else:
        recipients = recipients or {}
        if not recipients or sealed_nbytes(0, recipients) - SEAL_OVERHEAD > MAX_WRAPS_BYTES:
            raise ValueError(f"a shared blob needs 1 to about 5,000 recipients ({MAX_WRAPS_BYTES} bytes of "
                             f"wrapped keys), got {len(recipients)}")
        key = ChaCha20Poly1305.generate_key()
        for rid, rpub in sorted(recipients.items()):
            rb = rid.encode("utf-8")
            if len(rb) > 255:
                raise ValueError(f"recipient id {rid[:40]!r} is longer than 255 bytes")
            kek = _derive(eph.exchange(rpub), eph_pub, _raw(rpub), rid)
            wraps.append(bytes([len(rb)]) + rb + ChaCha20Poly1305(kek).encrypt(_WRAP_NONCE, key, aad))
    head = _HEAD.pack(SEAL_MAGIC, VERSION, 0, len(wraps), eph_pub, nonce)
    return b"".join([head, *wraps, ChaCha20Poly1305(key).encrypt(nonce, blob, aad)])


def open_blob(sealed: Buffer, aad: bytes, me: str, key: X25519PrivateKey, shared: bool | None = None) -> bytes:
    """The plaintext of a sealed blob addressed to `me` (holding `key`); AuthError reason `undecryptable` for
    a wrong key, a tampered ciphertext, another header (AAD) or a blob not sealed to `me`. `shared` False / True:
    the blob must have been sealed to one receiver / to a recipient list (None: either)."""
    view = memoryview(sealed).cast("B")
    if view.nbytes < SEAL_OVERHEAD or not is_sealed_blob(view):
        raise AuthError(f"blob of {view.nbytes} bytes is not sealed (no {SEAL_MAGIC!r} header)",
                        DropReason.UNDECRYPTABLE)
    magic, version, flags, n, eph_pub, nonce = _HEAD.unpack_from(view, 0)
    if version != VERSION or flags:
        raise AuthError(f"sealed blob version {version} (flags {flags}) is not supported (this build reads "
                        f"{VERSION})", DropReason.UNDECRYPTABLE)
    if shared is not None and shared != (n > 0):
        raise AuthError(f"blob sealed to {n} recipients where a {'shared' if shared else 'one-receiver'} blob was "
                        "expected", DropReason.UNDECRYPTABLE)
    try:
        eph = X25519PublicKey.from_public_bytes(eph_pub)
        pos, kek = _HEAD.size, _derive(key.exchange(eph), eph_pub, _raw(key.public_key()), me)
        content: bytes | None = kek if n == 0 else None
        for _ in range(n):
            rlen = view[pos]
            rid, wrapped = bytes(view[pos + 1:pos + 1 + rlen]), bytes(view[pos + 1 + rlen:pos + 1 + rlen + _WRAPPED])
            pos += 1 + rlen + _WRAPPED
            if rid == me.encode("utf-8") and content is None:
                content = ChaCha20Poly1305(kek).decrypt(_WRAP_NONCE, wrapped, aad)
        if pos + _TAG > view.nbytes:
            raise ValueError(f"recipient list runs past the blob's {view.nbytes} bytes")
        if content is None:
            raise AuthError(f"a shared blob sealed to {n} recipients, none of them {me!r} (was this device "
                            "provisioned after the server started? restart it with `--resume`)",
                            DropReason.UNDECRYPTABLE)
        return ChaCha20Poly1305(content).decrypt(nonce, view[pos:], aad)
    except (InvalidTag, ValueError, IndexError) as exc:
        raise AuthError(f"sealed blob does not open for {me!r}: wrong key, tampered ciphertext or another "
                        f"header ({type(exc).__name__}: {exc})", DropReason.UNDECRYPTABLE) from exc


# --- keys --------------------------------------------------------------------------------------------------


def load_encryption_private_key(path: str | Path) -> X25519PrivateKey:
    return load_key(path, X25519PrivateKey, "an X25519 private key")


def load_encryption_public_key(path: str | Path) -> X25519PublicKey:
    return load_key(path, X25519PublicKey, "an X25519 public key")


def load_peer_encryption_keys(directory: str | Path) -> dict[str, X25519PublicKey]:
    """`<node_id>.pub` X25519 public keys of a directory, by node id."""
    return load_key_dir(directory, X25519PublicKey, "an X25519 public key", "peer_encryption_keys_dir",
                        "provisioning's peers-x25519/")


