"""One logical device's own state: identity, PEFT tensors, optimizer state, data shard, privacy ledger, RNG.

Everything here is per device; everything shared (backbone, method, trainer) is in `client.runtime`.
`SharedRuntime.activate(state)` swaps a state in for its training window.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from fedpeft_edge.config import RunConfig
from fedpeft_edge.data import ClientData, PoolPartition, Source, build_client_data, build_local_data

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    """Who this device is in the run and where its data comes from."""

    device_id: str
    client_index: int | None  # None: the device's own local data set (deployment)


@dataclasses.dataclass
class DeviceOwnState:
    """What one device owns; swapped into the shared runtime before it trains and out after."""

    identity: AgentIdentity
    data: ClientData
    peft: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    privatizer: Any = None
    exhausted: bool = False

    @property
    def num_samples(self) -> int:
        return len(self.data.train_labels)

    def epsilon(self) -> float | None:
        return None if self.privatizer is None else float(self.privatizer.epsilon())

    def nbytes(self) -> dict[str, int]:
        """Bytes this device holds on its own (not the shared backbone): PEFT tensors, optimizer state, data."""
        peft = sum(t.numel() * t.element_size() for t in self.peft.values())
        opt = sum(t.numel() * t.element_size() for s in self.optimizer.get("state", {}).values()
                  for t in s.values() if isinstance(t, torch.Tensor))
        data = sum(int(getattr(loader.dataset, "nbytes", 0))
                   for loader in (self.data.train_loader, self.data.test_loader))
        return {"peft": peft, "optimizer": opt, "data": data, "total": peft + opt + data}


class RuntimeView(Protocol):
    """What a device's state is built from: the shared runtime (client.runtime.SharedRuntime), seen from here
    so that this module, which the runtime imports, does not import it back."""

    @property
    def cfg(self) -> RunConfig: ...

    @property
    def input_spec(self) -> Any: ...

    @property
    def initial_state(self) -> Mapping[str, torch.Tensor]: ...

    @property
    def blank_optimizer_state(self) -> dict[str, Any]: ...

    def source(self) -> Source: ...

    def partition(self) -> PoolPartition: ...


def build_device_state(runtime: RuntimeView, identity: AgentIdentity) -> DeviceOwnState:
    """A device's data shard, its privatizer (ledger), and its PEFT/optimizer/RNG state at the start."""
    cfg = runtime.cfg
    seed = cfg.common_args.random_seed
    if identity.client_index is None:
        data = build_local_data(cfg.data_args, runtime.input_spec, seed)
    else:
        data = build_client_data(cfg.data_args, runtime.input_spec, cfg.train_args.client_num_in_total, seed,
                                 identity.client_index, source=runtime.source(),
                                 partition=runtime.partition())
    rng = torch.Generator().manual_seed(seed * 1_000_003 + (identity.client_index or 0)).get_state()
    state = DeviceOwnState(
        identity=identity, data=data, peft={k: v.clone() for k, v in runtime.initial_state.items()},
        optimizer=copy.deepcopy(runtime.blank_optimizer_state), rng=rng,
        privatizer=_build_privatizer(runtime, identity, len(data.train_labels)),
    )
    state.exhausted = bool(state.privatizer is not None and state.privatizer.ledger.exhausted)
    log.info("device %s: %d local samples, own state %d bytes", identity.device_id, state.num_samples,
             state.nbytes()["total"])
    return state


def _build_privatizer(runtime: RuntimeView, identity: AgentIdentity, sample_size: int) -> Any:
    cfg = runtime.cfg
    if not cfg.dp_args.enabled:
        return None
    from fedpeft_edge.privacy import build_privatizer, ledger_path_for

    state_dir = cfg.device_args.state_dir
    ledger = ledger_path_for(f"{state_dir}/{identity.device_id}" if state_dir else None)
    return build_privatizer(
        cfg.dp_args,
        sample_size=sample_size,
        batch_size=cfg.data_args.batch_size,
        epochs_per_round=cfg.train_args.epochs,
        planned_rounds=cfg.train_args.comm_round,
        ledger_path=ledger,
        max_steps_per_round=cfg.train_args.max_steps,
    )
