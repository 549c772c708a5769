"""End-to-end message authentication: Ed25519 signatures over the topic, a timestamp, a nonce and the frame's
SHA-256, in a 96-byte envelope in front of the frame; a bounded per-sender replay window.

Envelope (little-endian): `FPS1 | ver u8 | 0 u8 | 0 u16 | timestamp f64 | nonce (16) | signature (64) | frame`.
Signed bytes: `FPS1 | ver | len(topic) u16 | topic | timestamp | nonce | sha256(frame)`. The topic names the
run, the direction and the device, so a message cannot be moved to another run, device or direction; the
frame's header names the round and message id. Brokers are not trusted: they only ever see sealed frames.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import AuthError, ConfigError

ENVELOPE_MAGIC = b"FPS1"
VERSION = 1
_ENV = struct.Struct("<4sBBHd16s64s")
ENVELOPE_BYTES = _ENV.size
_MAX_NONCES = 65_536  # per sender; beyond it the oldest are forgotten and the accepted floor rises

Buffer = bytes | bytearray | memoryview



def is_sealed(payload: Buffer) -> bool:
    return bytes(memoryview(payload)[:4]) == ENVELOPE_MAGIC


def load_key(path: str | Path, key_type: type, what: str) -> Any:
    """A PEM key file of `key_type` ("an Ed25519 private key", ...): ConfigError naming the file and the fix."""
    key = _load(path, private="private" in what)
    if not isinstance(key, key_type):
        raise ConfigError(f"{path} is not {what}; create keys with `fedpeft-edge provision`")
    return key


def load_key_dir(directory: str | Path, key_type: type, what: str, field: str, made_by: str) -> dict[str, Any]:
    """`<node_id>.pub` public keys of `key_type` in a directory, by node id (the directory is config `field`)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"comm_args.{field} {d} is not a directory; point it at {made_by}")
    return {p.stem: load_key(p, key_type, what) for p in sorted(d.glob("*.pub"))}


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    return load_key(path, Ed25519PrivateKey, "an Ed25519 private key")


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return load_key(path, Ed25519PublicKey, "an Ed25519 public key")


def load_peer_keys(directory: str | Path) -> dict[str, Ed25519PublicKey]:
    """`<node_id>.pub` files of a directory, by node id."""
    return load_key_dir(directory, Ed25519PublicKey, "an Ed25519 public key", "peer_keys_dir",
                        "provisioning's keys/")


def _load(path: str | Path, private: bool) -> object:
    try:
        data = Path(path).read_bytes()
        if private:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read {'private' if private else 'public'} key {path}: {exc}") from exc


def _signed_bytes(topic: str, ts: float, nonce: bytes, digest: bytes) -> bytes:
    t = topic.encode("utf-8")
    return b"".join([ENVELOPE_MAGIC, bytes([VERSION]), struct.pack("<H", len(t)), t,
                     struct.pack("<d", ts), nonce, digest])


def frame_digest(parts: Sequence[Buffer]) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


class Signer:
    """Seals outgoing frames with this node's private key."""

    def __init__(self, key: Ed25519PrivateKey, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    def envelope(self, topic: str, parts: Sequence[Buffer]) -> bytes:
        """The 96-byte envelope to send in front of `parts` (the frame) on `topic`."""
        ts, nonce = self._clock(), os.urandom(16)
        sig = self._key.sign(_signed_bytes(topic, ts, nonce, frame_digest(parts)))
        return _ENV.pack(ENVELOPE_MAGIC, VERSION, 0, 0, ts, nonce, sig)


class _Seen:
    """One sender's nonces inside the window, oldest first; anything at or below `floor` is refused."""

    def __init__(self) -> None:
        self.nonces: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.floor = -math.inf


class Verifier:
    """Checks envelopes from known senders; drops forged, stale and replayed ones with a reason.

    Replay window: a message is accepted once, and only if its timestamp is within `window_s` of our clock.
    Memory per sender is bounded by `max_nonces`: the oldest nonces are forgotten, and timestamps up to the
    newest forgotten one are refused from then on, so bounding memory never re-opens a replay.
    """

    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey],
        window_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        max_nonces: int = _MAX_NONCES,
        journal: str | Path | None = None,
    ) -> None:
        self._keys = dict(keys)
        self.window_s = window_s
        self._clock = clock
        self._max_nonces = max_nonces
        self._seen: dict[str, _Seen] = {}
        self._journal = ReplayJournal(Path(journal), self) if journal is not None else None

    def knows(self, sender: str) -> bool:
        return sender in self._keys

    def senders(self) -> tuple[str, ...]:
        """Every sender with a key here (a server's: its provisioned devices)."""
        return tuple(self._keys)

    def open(self, sender: str, topic: str, payload: Buffer, replay: bool = True) -> memoryview:
        """The frame inside a sealed payload from `sender` on `topic`; AuthError (with .reason) otherwise.

        `replay=False` skips the window (retained presence is old by design; its order is checked by the
        caller from the signed body).
        """
        view = memoryview(payload).cast("B")
        key = self._keys.get(sender)
        if key is None:
            raise AuthError(f"no public key for sender {sender!r}; provision it or add it to peer_keys_dir",
                            DropReason.UNKNOWN_SENDER)
        if view.nbytes < _ENV.size or not is_sealed(view):
            raise AuthError(f"message from {sender!r} on {topic} is not signed", DropReason.UNSIGNED)
        magic, version, flags, reserved, ts, nonce, sig = _ENV.unpack_from(view, 0)
        if version != VERSION or flags or reserved:
            raise AuthError(f"envelope version {version} (flags {flags}, {reserved}) from {sender!r} is not "
                            f"supported (this build reads version {VERSION})", DropReason.UNSIGNED)
        frame = view[_ENV.size:]
        try:
            key.verify(sig, _signed_bytes(topic, ts, nonce, frame_digest([frame])))
        except InvalidSignature as exc:
            raise AuthError(f"signature of a message from {sender!r} on {topic} does not verify",
                            DropReason.BAD_SIGNATURE) from exc
        if replay:
            self._check_fresh(sender, ts, bytes(nonce))
        return frame

    def _check_fresh(self, sender: str, ts: float, nonce: bytes) -> None:
        now = self._clock()
        if not math.isfinite(ts) or abs(now - ts) > self.window_s:
            raise AuthError(
                f"message from {sender!r} is stamped {ts - now:+.1f} s from our clock, outside the "
                f"{self.window_s:g} s window (comm_args.replay_window_s; check the clocks)", DropReason.STALE)
        seen = self._seen.setdefault(sender, _Seen())
        if nonce in seen.nonces or ts <= seen.floor:
            raise AuthError(f"message from {sender!r} was already received (replay)", DropReason.REPLAYED)
        self.remember(sender, ts, nonce, now)
        if self._journal is not None:
            self._journal.append(sender, ts, nonce)

    def remember(self, sender: str, ts: float, nonce: bytes, now: float | None = None) -> None:
        """Count (sender, ts, nonce) as received: accepted once, never again within the window."""
        now = self._clock() if now is None else now
        seen = self._seen.setdefault(sender, _Seen())
        seen.nonces[nonce] = ts
        horizon = now - self.window_s
        while seen.nonces:
            old, old_ts = next(iter(seen.nonces.items()))
            if old_ts >= horizon and len(seen.nonces) <= self._max_nonces:
                break
            del seen.nonces[old]
            seen.floor = max(seen.floor, old_ts)


class SenderRate:
    """A token bucket per sender, checked before any signature is verified or any chunk buffered: a sender
    holding broker credentials cannot make this node hash and verify faster than `rate_per_s` packets a
    second (after a burst of `burst`). Memory is bounded: past `max_senders` the least recent is forgotten."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_senders: int = 65_536) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self._clock = clock
        self._max = max_senders
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def allow(self, sender: str) -> bool:
        """Take one packet's token from `sender`'s bucket; False when it is empty (drop the packet)."""
        now = self._clock()
        tokens, at = self._buckets.pop(sender, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        ok = tokens >= 1.0
        self._buckets[sender] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return ok


class ReplayJournal:
    """The replay window on disk: every accepted (sender, timestamp, nonce) is appended before the message is
    acted on, so a restarted node (`fedpeft-server --resume`) refuses a frame it accepted before the restart.
    On open, the entries still inside the window are loaded and the file is rewritten with only them."""

    _COMPACT_EVERY = 100_000  # appended entries between rewrites

    def __init__(self, path: Path, verifier: Verifier) -> None:
        self.path, self._verifier = path, verifier
        self._appended = 0
        for sender, ts, nonce in self._read():
            verifier.remember(sender, ts, nonce)
        self._rewrite()

    def _read(self) -> list[tuple[str, float, bytes]]:
        horizon = self._verifier._clock() - self._verifier.window_s
        out = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read the replay journal {self.path}: {exc}") from exc
        for line in lines:
            try:
                sender, ts, nonce = json.loads(line)
                if ts >= horizon:
                    out.append((str(sender), float(ts), bytes.fromhex(nonce)))
            except (ValueError, TypeError):
                continue  # a line cut by a crash
        return out

    def _rewrite(self) -> None:
        entries = [(s, ts, n) for s, seen in self._verifier._seen.items() for n, ts in seen.nonces.items()]
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps([s, ts, n.hex()]) + "\n" for s, ts, n in entries)
        os.replace(tmp, self.path)
        self._fh = self.path.open("a", encoding="utf-8")
        self._appended = 0

    def append(self, sender: str, ts: float, nonce: bytes) -> None:
        self._fh.write(json.dumps([sender, ts, nonce.hex()]) + "\n")
        self._fh.flush()  # a crash of this process loses nothing written (the OS has it)
        self._appended += 1
        if self._appended >= self._COMPACT_EVERY:
            self._fh.close()
            self._rewrite()
