"""A hostile MQTT client for integration tests and benchmarks/bench_hostile.py: it connects anonymously or
with one device's broker credentials (and, as an insider, that device's signing key) and publishes, as fast as
QoS 1 allows, every kind of bad packet at the run's topics. It counts what the broker refused and what it
accepted."""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.wire.auth import Signer
from fedpeft_edge.wire.chunk import split_payload
from fedpeft_edge.wire.codec import encode_message

KINDS = ("random", "truncated", "wrong_types", "nested", "huge_chunk", "forged", "replayed", "other_topic",
         "false_presence")
# With the victim's own signing key (an insider, issue 25): frames that verify but whose headers are JSON bombs
# (more empty objects than the container bound; 4 MiB of them cost seconds of parsing each before it), and
# partial chunk transfers claiming 200 MB (buffered up to ~2 GB per sender before the manifest bounded them).
# Small packets on purpose: at thousands a second, large ones overflow the broker's queue for the server (its
# max_queued_messages drops them unseen), a different class.
INSIDER_KINDS = ("header_flood", "chunk_flood")


class HostileClient:
    """`connect()` says whether the broker let it in; `attack(n, seconds)` publishes and tallies."""

    def __init__(self, port: int, run_id: str, victim: str, other: str, username: str | None = None,
                 password: str | None = None, seed: int = 0, insider_key: Ed25519PrivateKey | None = None) -> None:
        self.port, self.run_id, self.victim, self.other = port, run_id, victim, other
        self.root = f"fedpeft/{run_id}"
        self.rng = random.Random(seed)
        self.key = Ed25519PrivateKey.generate()  # not a provisioned key: its signatures are forgeries
        self.insider = Signer(insider_key) if insider_key is not None else None
        self.kinds = KINDS + (INSIDER_KINDS if insider_key is not None else ())
        self.captured: list[bytes] = []  # the server's signed messages to the victim (it may read those)
        self.sent: Counter[str] = Counter()  # broker accepted (PUBACK success), by target topic kind
        self.refused: Counter[str] = Counter()  # broker refused (PUBACK >= 0x80, or no connection)
        self.connect_refused = False
        self.published = 0  # packets handed to paho so far
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.max_inflight_messages_set(1000)
        self._reasons: dict[int, int] = {}

    def connect(self, timeout_s: float = 10.0) -> bool:
        ready = threading.Event()
        ok: list[bool] = []

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            ok.append(not reason.is_failure)
            ready.set()

        self.client.on_connect = on_connect
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        ready.wait(timeout_s)
        if not ok or not ok[0]:
            self.connect_refused = True
            self.client.loop_stop()
            return False
        self.client.subscribe(f"{self.root}/s2d/{self.victim}", qos=1)
        return True

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            if len(self.captured) < 50:
                self.captured.append(bytes(msg.payload))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            self._reasons[mid] = int(getattr(reason, "value", 0) or 0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # --- packets ---------------------------------------------------------------------------------------
    def _frame(self, params: dict[str, Any], blob: bytes | None = None) -> bytes:
        return encode_message(params, blob)

    def packet(self, kind: str) -> tuple[str, bytes, bool]:
        """(topic, payload, retain) of one attack packet of `kind`."""
        up, pres = f"{self.root}/d2s/{self.victim}", f"{self.root}/presence/{self.victim}"
        r = self.rng
        base = {"msg_type": 3, "sender": self.victim, "receiver": 0, "msg_id": uuid.uuid4().hex, "round_idx": 1}
        if kind == "random":
            return up, r.randbytes(r.randint(0, 400)), False
        if kind == "truncated":
            f = self._frame(base, os.urandom(64))
            return up, f[:r.randint(0, len(f) - 1)], False
        if kind == "wrong_types":
            bad = r.choice([{"msg_type": [3]}, {"msg_type": {"a": 1}}, {"round_idx": "1"}, {"round_idx": -5},
                            {"sender": [self.victim]}, {"receiver": self.other}, {"sender": self.other},
                            {"num_samples": 10**12, "is_delta": "yes"}, {"_blob_key": 7}])
            return up, self._frame({**base, **bad}), False
        if kind == "nested":
            depth = r.choice([40, 1000, 100_000])
            header = b'{"msg_type":3,"x":' + b"[" * depth + b"]" * depth + b"}"
            return up, struct.pack("<4sBBHIQ", b"FPM1", 1, 0, 0, len(header), 0) + header, False
        if kind == "huge_chunk":
            chunk = bytearray(next(split_payload(b"\0" * 512, 300)))
            struct.pack_into("<IIQQ", chunk, 24, 0, 2_000_000, 1_900_000_000, 0)
            if r.random() < 0.5:
                struct.pack_into("<IIQ", chunk, 24, 0, 2, 1_900_000_000)  # count too small for the claim
            return up, bytes(chunk), False
        if kind == "header_flood" and self.insider is not None:
            header = b"[" * 5000 + b"]" * 5000  # over the container bound in 10 KB
            f = struct.pack("<4sBBHIQ", b"FPM1", 1, 0, 0, len(header), 0) + header
            return up, self.insider.envelope(up, [f]) + f, False
        if kind == "chunk_flood":  # the first chunk of a 200 MB transfer that never goes on
            size, total = 1024, 200_000_000
            head = struct.pack("<4sBBH16sIIQQ32s", b"FPC1", 1, 0, 0, uuid.uuid4().bytes, 0, -(-total // size), total,
                               0, os.urandom(32))
            return up, head + bytes(size), False
        if kind == "forged":
            f = self._frame(base, os.urandom(32))
            return up, Signer(self.key).envelope(up, [f]) + f, False
        if kind == "replayed":
            with self._lock:
                old = r.choice(self.captured) if self.captured else None
            if old is None:
                f = self._frame(base)
                return up, Signer(self.key).envelope(up, [f]) + f, False
            return r.choice([up, pres]), old, False
        if kind == "other_topic":
            target = r.choice([f"{self.root}/d2s/{self.other}", f"{self.root}/s2d/{self.other}",
                               f"{self.root}/presence/{self.other}", f"{self.root}/presence/0",
                               f"{self.root}/s2d/{self.victim}"])
            return target, self._frame({**base, "sender": target.rsplit("/", 1)[-1]}), False
        body = json.dumps({"status": "OFFLINE", "node": self.victim, "time": time.time() + 1e6, "seq": 9}).encode()
        if r.random() < 0.5:
            body = Signer(self.key).envelope(pres, [body]) + body
        return pres, body, r.random() < 0.2

    def attack(self, max_messages: int, max_seconds: float, window: int = 200,
               stop: Callable[[], bool] | None = None, rate: Callable[[], float] | None = None) -> float:
        """Publish up to max_messages (QoS 1, `window` in flight) for at most max_seconds, or until stop();
        `rate()` paces it in messages per second (0 = pause, < 0 = as fast as it goes). Returns the rate."""
        t0 = time.monotonic()
        inflight: list[tuple[Any, str]] = []
        n = 0
        pace_t, pace_n = t0, 0
        while n < max_messages and time.monotonic() - t0 < max_seconds:
            if stop is not None and n % 25 == 0 and stop():
                break
            if rate is not None:
                want = rate()
                if want == 0:
                    self._settle(inflight)
                    time.sleep(0.05)
                    pace_t, pace_n = time.monotonic(), 0
                    continue
                if want > 0 and pace_n >= want * (time.monotonic() - pace_t):
                    time.sleep(min(0.01, 1 / want))
                    continue
            kind = self.kinds[n % len(self.kinds)]
            topic, payload, retain = self.packet(kind)
            inflight.append((self.client.publish(topic, payload, qos=1, retain=retain), topic))
            n += 1
            pace_n += 1
            self.published += 1
            if len(inflight) >= window:
                self._settle(inflight)
        self._settle(inflight)
        return n / max(time.monotonic() - t0, 1e-9)

    def _settle(self, inflight: list[tuple[Any, str]]) -> None:
        for info, topic in inflight:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(10)
            with self._lock:
                code = self._reasons.pop(info.mid, 0)
            failed = not info.is_published() or code >= 0x80
            kind = topic.split("/")[-2] + ("" if topic.endswith("/" + self.victim) else "-other")
            (self.refused if failed else self.sent)[kind] += 1
        inflight.clear()
