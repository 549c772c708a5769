"""K logical devices in one process on ONE frozen backbone, each its own node on the broker.

Every device has its own id, comm manager (MQTT connection, presence, last will, credentials through its own
CommArgs), PEFT tensors, optimizer state, data shard and privacy ledger: on the wire it cannot be told from a
separate agent. Each device's receive loop runs on its own thread (paho's network thread only moves bytes);
training goes to a bounded pool of `train_workers` threads, each window on one of as many model slots (the
shared model, or replicas that share its frozen tensors: `SharedRuntime.activate`). One at a time by default.
A single agent is a fleet of one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from fedpeft_edge.client.device import AgentIdentity, build_device_state
from fedpeft_edge.client.logic import DeviceLogic
from fedpeft_edge.client.manager import DeviceManager
from fedpeft_edge.client.runtime import SharedRuntime
from fedpeft_edge.config import CommArgs, RunConfig
from fedpeft_edge.errors import ConfigError

log = logging.getLogger(__name__)


def fleet_identities(count: int, start: int, pattern: str) -> list[AgentIdentity]:
    """`count` devices on partition shards start..start+count-1, named by `pattern` ("dev{index}")."""
    if count < 1:
        raise ConfigError(f"--fleet {count}: a fleet hosts at least one device")
    if start < 0:
        raise ConfigError(f"--client-index-start {start} must be >= 0")
    try:
        ids = [pattern.format(index=i) for i in range(start, start + count)]
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"device id pattern {pattern!r} is not a format with {{index}} only, e.g. "
                          "'edge-{index:03d}'") from exc
    if len(set(ids)) != len(ids):
        raise ConfigError(f"device id pattern {pattern!r} gives the same id twice; put {{index}} in it")
    return [AgentIdentity(device_id, i) for device_id, i in zip(ids, range(start, start + count), strict=True)]


class FleetHost:
    """Builds the shared runtime once, then one device state, logic and comm manager per identity."""

    def __init__(self, cfg: RunConfig, identities: Sequence[AgentIdentity], train_workers: int = 1,
                 comm_args_for: Callable[[str], CommArgs] | None = None) -> None:
        if train_workers < 1:
            raise ConfigError(f"--train-workers {train_workers} must be >= 1")
        self.runtime = SharedRuntime(cfg, slots=train_workers)
        self.pool = ThreadPoolExecutor(max_workers=train_workers, thread_name_prefix="train")
        self.managers: list[DeviceManager] = []
        try:
            for identity in identities:
                state = build_device_state(self.runtime, identity)
                comm = comm_args_for(identity.device_id) if comm_args_for else cfg.comm_args
                logic = DeviceLogic(self.runtime, state)
                self.managers.append(DeviceManager(logic, comm, cfg.common_args.run_id, pool=self.pool))
        except BaseException:
            self.close()
            raise
        log.info("fleet of %d devices ready on one backbone (%.1f MB shared)", len(self.managers),
                 self.runtime.shared_bytes() / 2**20)

    def run(self) -> int:
        """Serve every device until each has finished (FINISH or refusal); the worst exit code."""
        threads = [threading.Thread(target=m.run, name=f"rx-{m.logic.device_id}", daemon=True)
                   for m in self.managers]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
        return max((m.exit_code for m in self.managers), default=0)

    def stop(self) -> None:
        """Leave the run: every device stops its receive loop and disconnects (OFFLINE presence)."""
        for m in self.managers:
            m.finish()

    def close(self) -> None:
        """Drop queued training, wait for the one in flight (it sends nothing once finished), disconnect."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for m in self.managers:
            m.com_manager.close()
