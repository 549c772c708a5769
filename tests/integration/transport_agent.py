"""A minimal device for transport integration tests: join, answer each model with model + device id, finish.

Run as a real process: `python transport_agent.py --port P --run-id R --device-id N [--max-message-bytes B]`.
If the server's config asks for `reply_numel`, the reply is instead a seeded random tensor of that size (for
the large-transfer test), so the server can rebuild it and compare bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from fedpeft_edge.config import CommArgs
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import ConnectionReady
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors


def seeded_state(numel: int, seed: int) -> dict[str, torch.Tensor]:
    """The large update both sides can rebuild."""
    return {"w": torch.randn(numel, generator=torch.Generator().manual_seed(seed))}


class Agent:
    def __init__(self, mgr: MqttCommManager, device_id: int, encoding: str) -> None:
        self.mgr, self.device_id, self.encoding = mgr, device_id, encoding
        self.joined = False

    def receive_local(self, event: Any) -> None:
        if isinstance(event, ConnectionReady) and not self.joined:  # a local event: never a frame
            self.joined = True
            self.mgr.send_message(Message(M.MSG_TYPE_C2S_JOIN, self.device_id, M.SERVER_ID))

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        if msg_type == M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT:
            self._reply(msg)
        elif msg_type == M.MSG_TYPE_S2C_FINISH:
            self.mgr.stop_receive_message()

    def _reply(self, msg: Any) -> None:
        config = msg.get(M.MSG_ARG_KEY_CONFIG) or {}
        if "reply_numel" in config:
            state = seeded_state(config["reply_numel"], config["seed"])
            manifest = Manifest("full", (TensorSpec.of("w", state["w"]),))
        else:
            manifest = Manifest.from_json(msg.get(M.MSG_ARG_KEY_MANIFEST))
            blob, expected = msg.get(M.MSG_ARG_KEY_MODEL_PARAMS), msg.get(M.MSG_ARG_KEY_MANIFEST_HASH)
            down = decode_tensors(blob, manifest, expected)
            state = {k: v + float(self.device_id) for k, v in down.items()}
        reply = Message(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, self.device_id, M.SERVER_ID)
        reply.add_params(M.MSG_ARG_KEY_ROUND, msg.get(M.MSG_ARG_KEY_ROUND))
        reply.add_params(M.MSG_ARG_KEY_NUM_SAMPLES, 10 * self.device_id)
        reply.add_params(M.MSG_ARG_KEY_MANIFEST_HASH, manifest.hash)
        reply.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, manifest, self.encoding))
        self.mgr.send_message(reply)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--device-id", type=int, required=True)
    p.add_argument("--max-message-bytes", type=int, default=268_435_455)
    p.add_argument("--mqtt-version", default="5", choices=["5", "3.1.1"])
    p.add_argument("--encoding", default="fp32")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"agent{a.device_id} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args = CommArgs(broker_host=a.host, broker_port=a.port, max_message_bytes=a.max_message_bytes,
                    mqtt_version=a.mqtt_version, publish_timeout_s=60.0)
    mgr = MqttCommManager(args, a.run_id, a.device_id)
    mgr.add_observer(Agent(mgr, a.device_id, a.encoding))
    mgr.handle_receive_message()
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
