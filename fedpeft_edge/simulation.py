"""A whole federated run in one process: the real server and N device logics on an in-memory bus.

The server is the same object the `fedpeft-server` program runs, the devices the same DeviceLogic a
`fedpeft-agent` runs, and they exchange the same framed, encoded messages (`transport.memory`); only the
broker is gone. The N devices share ONE frozen backbone (`client.runtime.SharedRuntime`): each swaps in its
own PEFT tensors, optimizer state, data shard, ledger and RNG to train. Messages are delivered in order on
one thread, so a seed gives the same global tensors every time (and the same as over MQTT). Byte figures
are the encoded frames (`bytes_kind: "encoded"` in the records and summary), not MQTT packets on a wire.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedpeft_edge.client.device import AgentIdentity, build_device_state
from fedpeft_edge.client.logic import DeviceLogic
from fedpeft_edge.client.manager import DeviceManager
from fedpeft_edge.client.runtime import SharedRuntime, replicate
from fedpeft_edge.config import RunConfig, replace_in
from fedpeft_edge.errors import ConfigError
from fedpeft_edge.transport.memory import MemoryBus, memory_backend

log = logging.getLogger(__name__)

BYTES_KIND = "encoded"


def simulation_config(cfg: RunConfig, devices: int | None) -> RunConfig:
    """The config with `devices` devices in total (per-round counts clamped to it); unchanged for None."""
    if devices is None:
        return cfg
    if devices < 1:
        raise ConfigError(f"--devices {devices}: a simulation needs at least one device")
    t = cfg.train_args
    return replace_in(cfg, **{
        "train_args.client_num_in_total": devices,
        "train_args.client_num_per_round": min(t.client_num_per_round, devices),
        "train_args.min_devices": min(t.min_devices, devices),
        "train_args.min_updates": min(t.min_updates, devices),
    })


class Simulation:
    """The server and `client_num_in_total` devices (shards 0..N-1, ids dev0..) on one bus."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False) -> None:
        from fedpeft_edge.server.app import ServerApp, ServerModel

        t0 = time.perf_counter()
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.tracking_args.run_dir) / cfg.common_args.run_id
        self.bus = MemoryBus(cfg.comm_args.max_update_bytes + 1024 * 1024)

        backend = memory_backend(self.bus)
        self.runtime = SharedRuntime(cfg)
        # The server evaluates on a replica of the devices' model (own PEFT tensors, the SAME frozen ones) and
        # reads its test set from the same data source: one backbone and one data set in the process.
        rt = self.runtime
        model = ServerModel(rt.method, replicate(rt.model, rt.manifest.names), rt.input_spec, rt.device,
                            rt.source())
        self.server = ServerApp(cfg, self.run_dir, resume=resume, backend=backend, bytes_kind=BYTES_KIND,
                                model=model)
        self.devices: list[DeviceManager] = []
        for i in range(cfg.train_args.client_num_in_total):
            state = build_device_state(self.runtime, AgentIdentity(f"dev{i}", i))
            self.devices.append(DeviceManager(DeviceLogic(self.runtime, state), cfg.comm_args,
                                              cfg.common_args.run_id, backend=backend))
        self.setup_s = time.perf_counter() - t0
        if cfg.comm_args.encrypt or cfg.comm_args.require_signatures:  # one process, nothing crosses a network
            log.info("simulate: messages stay in this process on an in-memory bus, so they are neither signed nor "
                     "encrypted (comm_args.require_signatures / encrypt apply on MQTT only)")
        log.info("simulation of %d devices ready in %.1fs (one shared backbone, %.1f MB)", len(self.devices),
                 self.setup_s, self.runtime.shared_bytes() / 2**20)

    def run(self) -> Path:
        """Run every round to the end; the run directory (metrics.jsonl, summary.json, checkpoints)."""
        try:
            self.server.run_until_done()
        finally:
            for d in self.devices:
                d.com_manager.close()
        return self.run_dir
