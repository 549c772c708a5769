"""End-to-end encryption through a real provisioned mosquitto: a task, an update and the shared model arrive as
their plaintext tensors; the meter counts the ciphertext (68 bytes more than plaintext for one receiver); a device
holding the wrong key and a server receiving plaintext drop the message with a reason and keep serving."""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.protocol import keys as K
from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.fedml import message_of
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.transport.provision import provision
from fedpeft_edge.wire.auth import ENVELOPE_BYTES
from fedpeft_edge.wire.codec import message_parts
from fedpeft_edge.wire.seal import SEAL_OVERHEAD

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]

RUN = "t"
TENSORS = bytes(range(256)) * 64  # 16 KiB standing in for an encoded update


class _Node:
    def __init__(self, comm: CommArgs, node: str) -> None:
        self.got: list[Any] = []
        self.drops: list[DroppedMessage] = []
        self.comm = MqttCommManager(comm, RUN, node, on_drop=self.drops.append)
        self.comm.add_observer(self)

    def receive_message(self, _t: Any, msg: Any) -> None:
        self.got.append(msg.get_params())


def _comm(prov: Any, node: str, port: int, **kw: Any) -> CommArgs:
    snippet = yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"]
    return CommArgs(broker_host="127.0.0.1", broker_port=port, publish_timeout_s=10.0, model_delivery="shared",
                    **{**snippet, **kw})


def _params(msg_type: int, sender: Any, receiver: Any) -> dict[str, Any]:
    return {K.MSG_ARG_KEY_TYPE: msg_type, K.MSG_ARG_KEY_SENDER: sender, K.MSG_ARG_KEY_RECEIVER: receiver,
            K.MSG_ARG_KEY_ROUND: 1, K.MSG_ARG_KEY_MSG_ID: uuid.uuid4().hex, K.MSG_ARG_KEY_MODEL_PARAMS: TENSORS}


def _pump(nodes: list[_Node], cond: Any, what: str, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        for n in nodes:
            n.comm.poll(0.02)


def test_sealed_tensors_cross_the_broker_and_bad_keys_are_dropped_with_a_reason(tmp_path: Path) -> None:
    prov, other = provision(tmp_path / "prov", ["d1", "d2"]), provision(tmp_path / "other", ["d2"])
    with start_broker(secure_dir=prov.root) as broker:
        server = _Node(_comm(prov, "0", broker.port), "0")
        d1 = _Node(_comm(prov, "d1", broker.port), "d1")
        wrong = str(other.node_dir("d2") / "encryption.key")  # d2 holds a key the server never sealed to
        d2 = _Node(_comm(prov, "d2", broker.port, encryption_key_file=wrong), "d2")
        nodes = [server, d1, d2]
        try:
            rec = server.comm.send_message(message_of(_params(K.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, 0, "d1")))
            plain = sum(memoryview(p).nbytes for p in message_parts(
                {k: v for k, v in _params(K.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, 0, "d1").items()
                 if k != K.MSG_ARG_KEY_MODEL_PARAMS} | {"_blob_key": K.MSG_ARG_KEY_MODEL_PARAMS}, TENSORS))
            assert rec.payload_bytes == plain + ENVELOPE_BYTES + SEAL_OVERHEAD  # the meter counts the ciphertext
            server.comm.send_message(message_of(_params(K.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, 0, "d2")))
            server.comm.send_message(message_of(_params(K.MSG_TYPE_S2C_MODEL, 0, K.BROADCAST)))
            _pump(nodes, lambda: len(d1.got) == 2 and len(d2.drops) >= 2, "the task, the model and d2's drops")
            assert all(bytes(p[K.MSG_ARG_KEY_MODEL_PARAMS]) == TENSORS for p in d1.got)
            assert {d.reason for d in d2.drops} == {"undecryptable"} and not d2.got
            d1.comm.send_message(message_of(_params(K.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, "d1", 0)))
            _pump(nodes, lambda: len(server.got) == 1, "d1's update")
            assert bytes(server.got[0][K.MSG_ARG_KEY_MODEL_PARAMS]) == TENSORS
            d2.comm.close()
            d2 = _Node(_comm(prov, "d2", broker.port, encrypt=False), "d2")  # signed, tensors in plaintext
            nodes[2] = d2
            d2.comm.send_message(message_of(_params(K.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, "d2", 0)))
            _pump(nodes, lambda: any(d.reason == "unencrypted" for d in server.drops), "the plaintext update's drop")
            d1.comm.send_message(message_of(_params(K.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, "d1", 0)))
            _pump(nodes, lambda: len(server.got) == 2, "d1's second update (the server kept serving)")
        finally:
            for n in nodes:
                n.comm.close()


def test_a_sealed_update_larger_than_a_chunk_travels_as_chunks_of_ciphertext(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["d1"])
    with start_broker(secure_dir=prov.root) as broker:
        server = _Node(dataclasses.replace(_comm(prov, "0", broker.port), chunk_bytes=4096), "0")
        d1 = _Node(dataclasses.replace(_comm(prov, "d1", broker.port), chunk_bytes=4096), "d1")
        try:
            rec = d1.comm.send_message(message_of(_params(K.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, "d1", 0)))
            assert rec.chunks > 3
            _pump([server, d1], lambda: len(server.got) == 1, "the chunked update")
            assert bytes(server.got[0][K.MSG_ARG_KEY_MODEL_PARAMS]) == TENSORS
        finally:
            server.comm.close()
            d1.comm.close()
