"""An insider for integration tests: a provisioned device (its own broker password and signing key) that
follows the protocol but poisons: it joins honestly, re-joins claiming 1e9 samples, and answers every round
task with -4 x the global model shifted by `shift` claiming 1e9 samples (issue 25's attack; the shift keeps it
strong where the global tensors start near zero, as a random-init backbone's biases do). It speaks through
the library's own MQTT transport, so everything it sends is correctly signed on its own channel."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fedpeft_edge.backbone import fingerprint_backbone
from fedpeft_edge.config import load_config
from fedpeft_edge.protocol import SERVER_ID, Channel, Finish, Join, JoinAck, Presence, RoundTask, Update, parse
from fedpeft_edge.server.app import build_server_model
from fedpeft_edge.transport.fedml import message_of
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.wire.codec import decode_tensors, encode_update

INFLATED = 10**9


class InsiderDevice:
    """`start()` connects and serves on a thread until the server's Finish (or `stop()`)."""

    def __init__(self, config: Path, device_id: str, honest_samples: int = 50, factor: float = -4.0,
                 shift: float = -5.0) -> None:
        cfg = load_config(config)
        model = build_server_model(cfg)  # the run's backbone and method: the same fingerprint and manifest
        self.manifest = model.method.manifest(model.model)
        self.fingerprint = fingerprint_backbone(model.model, self.manifest)
        self.device_id, self.honest, self.factor, self.shift = device_id, honest_samples, factor, shift
        self.comm = MqttCommManager(cfg.comm_args, cfg.common_args.run_id, device_id)
        self.comm.add_observer(self)
        self.joins = 0
        self.updates = 0
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> InsiderDevice:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.finished.set()
        self._thread.join(timeout=10)
        self.comm.close()

    def _serve(self) -> None:
        while not self.finished.is_set():
            self.comm.poll(0.2)

    def _send(self, msg: Any) -> None:
        self.comm.send_message(message_of(msg.to_params()))

    def _join(self) -> None:
        samples = self.honest if self.joins == 0 else INFLATED  # honest first, then a re-join claiming 1e9
        self.joins += 1
        self._send(Join(sender=self.device_id, backbone_fingerprint=self.fingerprint,
                        manifest_hash=self.manifest.hash, num_samples=samples))

    def receive_local(self, event: Any) -> None:
        if isinstance(event, Presence) and event.node == str(SERVER_ID) and event.online:
            self._join()

    def receive_message(self, _msg_type: Any, msg: Any) -> None:
        try:
            typed = parse(msg.get_params(), Channel.SERVER_TO_DEVICE)
        except Exception:  # nothing the test needs
            return
        if isinstance(typed, JoinAck) and typed.accepted and self.joins == 1:
            time.sleep(0.2)
            self._join()
        elif isinstance(typed, RoundTask) and typed.blob:
            g = decode_tensors(typed.blob, self.manifest, self.manifest.hash)
            evil = {k: self.factor * v.float() + self.shift for k, v in g.items()}
            self.updates += 1
            self._send(Update(sender=self.device_id, round=typed.round, num_samples=INFLATED,
                              blob=encode_update(evil, self.manifest, "fp32"), manifest_hash=self.manifest.hash,
                              encoding="fp32", model_version=typed.model_version, msg_id=uuid.uuid4().hex,
                              sent_at=time.time()))
        elif isinstance(typed, Finish):
            self.finished.set()
