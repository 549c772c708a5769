"""What a device process builds ONCE, whatever number of devices it hosts: backbone, method, trainer, profile.

`SharedRuntime` holds the frozen backbone with the PEFT method applied, its manifest and fingerprint, THE
training loop (`LocalTrainer`, optimizer built once), the resource monitor and the hardware profile. A device's
own state (`client.device.DeviceOwnState`) is swapped into it for a training window by `activate()` and out again
after, so one agent, a fleet of K devices and the simulator run the same objects on one copy of the backbone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import queue
import time
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone, named_tensors
from fedpeft_edge.client import allocator
from fedpeft_edge.client.device import DeviceOwnState
from fedpeft_edge.config import RunConfig
from fedpeft_edge.data import PoolPartition, Source
from fedpeft_edge.errors import ConfigError, FedPeftError
from fedpeft_edge.metering.device_profile import collect_device_profile
from fedpeft_edge.metering.resources import ResourceMonitor
from fedpeft_edge.peft import build_method
from fedpeft_edge.peft.base import StateBinding
from fedpeft_edge.peft.shapes import DeviceLayout
from fedpeft_edge.protocol import EvalReport
from fedpeft_edge.training import LocalTrainer, evaluate, resolve_device

log = logging.getLogger(__name__)

#: Trim the C heap after a round at most this often (seconds): see `SharedRuntime.release_heap`.
RELEASE_INTERVAL_S = 1.0


@dataclasses.dataclass(frozen=True)
class TrainingSlot:
    """A model a device trains on: the shared one, or a replica whose frozen tensors ARE the shared ones."""

    index: int
    model: nn.Module
    trainer: LocalTrainer
    binding: StateBinding  # the model's shared tensors, looked up once: a window swaps them without a model walk


def replicate(model: nn.Module, own: Collection[str]) -> nn.Module:
    """A copy of `model` that owns the tensors named in `own` (the manifest's: what a device trains and the
    server sets) and shares every other parameter and buffer (same storage): a second model for the bytes of
    the PEFT part only. Buffers in the manifest (e.g. BatchNorm statistics) are owned, never shared."""
    names = set(own)
    owned = {id(t) for name, t in named_tensors(model).items() if name in names}
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())
                            if not t.requires_grad and id(t) not in owned}
    return copy.deepcopy(model, memo)


class SharedRuntime:
    """One frozen backbone + PEFT method + trainer per process; devices take turns on it (`activate`).

    `slots` > 1 adds replicas sharing the frozen tensors, so that many devices train at once (a fleet's
    --train-workers); the global torch RNG is then shared by concurrent windows, so runs are not reproducible.
    """

    def __init__(self, cfg: RunConfig, slots: int = 1) -> None:
        t0 = time.perf_counter()
        if slots < 1:
            raise ConfigError(f"training slots must be >= 1, got {slots}")
        if slots > 1 and cfg.device_args.eval_backend == "onnxruntime":
            raise ConfigError("device_args.eval_backend 'onnxruntime' evaluates one model: use --train-workers 1 "
                              "or eval_backend 'torch'")
        self.cfg = cfg
        allocator.tune()
        if cfg.device_args.num_threads:
            torch.set_num_threads(cfg.device_args.num_threads)
        self.device = resolve_device(cfg.device_args.device)
        # The run's seed: randomly initialised frozen tensors must be identical on every device and on the
        # server, or the backbone fingerprints differ.
        torch.manual_seed(cfg.common_args.random_seed)
        backbone = build_backbone(cfg.model_args, image_size=cfg.data_args.image_size)
        self.backbone_name = backbone.name
        self.input_spec: Any = backbone.data_config  # an image InputSpec, or a text backbone's TextSpec
        self.method = build_method(cfg.peft_args)
        self.model = self.method.apply(backbone.model).to(self.device)
        self.manifest = self.method.manifest(self.model)
        self.fingerprint = fingerprint_backbone(self.model, self.manifest)
        self.initial_state = self.method.get_state(self.model)
        self.trainer = LocalTrainer(self.model, cfg.train_args, self.device, ())
        self.blank_optimizer_state = copy.deepcopy(self.trainer.base_optimizer.state_dict())
        self.monitor = ResourceMonitor(cfg.device_args.metering_interval_s)
        self.onnx = self._build_onnx_evaluator()
        self.profile = collect_device_profile()
        self.profile["inference_latency_ms"] = self._measure_latency()
        self.profile["eval_backend"] = cfg.device_args.eval_backend
        self.profile["startup_s"] = round(time.perf_counter() - t0, 3)
        shared = set(self.manifest.names)
        self._shared_bytes = sum(t.numel() * t.element_size() for k, t in named_tensors(self.model).items()
                                 if k not in shared)
        self._free: queue.Queue[TrainingSlot] = queue.Queue()
        self._free.put(TrainingSlot(0, self.model, self.trainer, self.method.bind(self.model)))
        for i in range(1, slots):
            replica = replicate(self.model, self.manifest.names)
            self._free.put(TrainingSlot(i, replica, LocalTrainer(replica, cfg.train_args, self.device, ()),
                                        self.method.bind(replica)))
        self._active: dict[int, tuple[DeviceOwnState, TrainingSlot]] = {}
        self._layouts: dict[int, DeviceLayout] = {}
        self._released_at = -math.inf
        self._source: Source | None = None
        self._partition: PoolPartition | None = None
        log.info("runtime ready in %.1fs: %s, method %s (%d shared params), shared backbone %.1f MB",
                 time.perf_counter() - t0, backbone.name, self.manifest.method, self.manifest.num_params,
                 self.shared_bytes() / 2**20)

    # --- set-up -------------------------------------------------------------------------------------------
    def _build_onnx_evaluator(self) -> Any:
        if self.cfg.device_args.eval_backend != "onnxruntime":
            return None
        try:
            from fedpeft_edge.export.inference import OnnxEvaluator
        except ImportError as exc:
            raise ConfigError(
                f"device_args.eval_backend='onnxruntime' needs the onnx extra ({exc}); "
                "pip install 'fedpeft-edge[onnx]' or set eval_backend: torch"
            ) from exc

        return OnnxEvaluator(self.model, self.input_spec, num_threads=self.cfg.device_args.num_threads,
                             method=self.method, image_size=self.cfg.data_args.image_size)

    def _measure_latency(self) -> dict[str, Any] | None:
        """Batch-1 latency of the exported model on this hardware (median over runs), for the profile."""
        if not self.cfg.device_args.measure_latency:
            return None
        try:
            from fedpeft_edge.export.inference import OnnxEvaluator
        except ImportError as exc:  # an agent-only install without the onnx extra
            log.warning("no ONNX inference latency in the device profile: %s (pip install 'fedpeft-edge[onnx]')",
                        exc)
            return None

        try:
            evaluator = self.onnx or OnnxEvaluator(self.model, self.input_spec,
                                                   num_threads=self.cfg.device_args.num_threads,
                                                   method=self.method, image_size=self.cfg.data_args.image_size)
            return dict(evaluator.latency(runs=self.cfg.device_args.latency_runs))
        except FedPeftError as exc:
            log.warning("cannot measure ONNX inference latency on this device: %s", exc)
            return None

    def source(self) -> Source:
        """The shared data set, read once for every partition client this process hosts."""
        if self._source is None:
            from fedpeft_edge.data import load_source

            self._source = load_source(self.cfg.data_args)
        return self._source

    def partition(self) -> PoolPartition:
        """The partition of the shared data set across train_args.client_num_in_total, computed once."""
        if self._partition is None:
            from fedpeft_edge.data import partition_source

            cfg = self.cfg
            self._partition = partition_source(self.source(), cfg.data_args, cfg.train_args.client_num_in_total,
                                               cfg.common_args.random_seed)
        return self._partition

    def layout(self, rank: int | None) -> DeviceLayout | None:
        """The method's layout at a task's `rank` (built once per rank); None for a task that names none."""
        if rank is None:
            return None
        if rank not in self._layouts:
            self._layouts[rank] = self.method.layout_at(self.manifest, rank)
        return self._layouts[rank]

    def shared_bytes(self) -> int:
        """Bytes of the frozen backbone (every parameter and buffer not in the manifest): shared by all devices."""
        return self._shared_bytes

    # --- a device's training window -----------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self, state: DeviceOwnState, peft: Mapping[str, torch.Tensor] | None = None) -> Iterator[TrainingSlot]:
        """Swap `state` into a free slot (PEFT tensors, optimizer state, data loader, DP wrapper, RNG), yield
        the slot, swap the state out. With every slot busy, the call waits for one.

        `peft`: the tensors to start from instead of the device's own (a round starting from the global model
        writes them once instead of writing the device's and then the global ones); they must come from the
        codec's decode, which checked their finiteness where they entered this process.

        One copy in (the tensors into the slot's model) and one copy out (`state.peft`, the window's result:
        read it after the block, it is the device's state and what it sends)."""
        slot = self._free.get()
        trainer = slot.trainer
        try:
            rng = torch.get_rng_state()
            # no finiteness pass: the device's own tensors came out of its own window, a global state from decode
            slot.binding.set(state.peft if peft is None else peft, check_finite=False)
            trainer.bind(state.data.train_loader, state.privatizer)
            if trainer.keep_optimizer_state:  # otherwise train() clears it: nothing of a device's to swap
                trainer.base_optimizer.load_state_dict(state.optimizer)
            torch.set_rng_state(state.rng)
            self._active[id(state)] = (state, slot)
            try:
                yield slot
            finally:
                del self._active[id(state)]
                state.rng = torch.get_rng_state()
                if trainer.keep_optimizer_state:
                    state.optimizer = copy.deepcopy(trainer.base_optimizer.state_dict())
                state.peft = slot.binding.get()
                trainer.bind((), None)
                torch.set_rng_state(rng)
        finally:
            self._free.put(slot)

    def release_heap(self) -> None:
        """Hand the C heap's free pages back to the OS after a round's reply is sent (off the round's critical
        path), at most every RELEASE_INTERVAL_S: a fleet's windows last milliseconds, and trimming after each
        one made the next re-fault its buffers (bench_scale, 250 devices per host: the training thread took
        516 minor faults and 2.5 ms of system CPU per device and round; 30 and 0.8 ms trimming at most once
        a second)."""
        now = time.monotonic()
        if now - self._released_at >= RELEASE_INTERVAL_S:
            self._released_at = now
            allocator.release()

    def _slot_of(self, state: DeviceOwnState) -> TrainingSlot:
        try:
            return self._active[id(state)][1]
        except KeyError:
            raise FedPeftError(f"device {state.identity.device_id} is not active; wrap the call in activate()") \
                from None

    def load_peft(self, state: DeviceOwnState, tensors: dict[str, torch.Tensor]) -> None:
        """Set an active device's PEFT tensors (checked against the manifest)."""
        self._slot_of(state).binding.set(tensors)

    def current_peft(self, state: DeviceOwnState) -> dict[str, torch.Tensor]:
        """An active device's PEFT tensors as they are now."""
        return self._slot_of(state).binding.get()

    def evaluate(self, state: DeviceOwnState) -> EvalReport | None:
        """Top-1 and loss of an active device's model on its local test split (torch or onnxruntime)."""
        if not len(state.data.test_labels):
            return None
        model = self._slot_of(state).model
        t0 = time.perf_counter()
        if self.onnx is not None:
            self.onnx.refresh(model)
            res = self.onnx.evaluate(state.data.test_loader)
        else:
            res = evaluate(model, state.data.test_loader, self.device)
        return EvalReport(loss=res.loss, top1=res.top1, samples=res.samples,
                          backend="onnxruntime" if self.onnx is not None else "torch",
                          eval_s=time.perf_counter() - t0)
