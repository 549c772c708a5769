"""The device side of a round: one backbone, one PEFT method, one trainer, built once; rounds swap tensors.

`DeviceAgent` knows nothing of MQTT: it turns the server's typed messages (protocol/) into replies. The
transport binding is `client/manager.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone
from fedpeft_edge.config import RunConfig
from fedpeft_edge.data import ClientData, build_client_data, build_local_data
from fedpeft_edge.errors import BudgetExhaustedError, ConfigError, FedPeftError, ProtocolError
from fedpeft_edge.metering.device_profile import collect_device_profile
from fedpeft_edge.metering.resources import ResourceMonitor
from fedpeft_edge.peft import build_method
from fedpeft_edge.protocol import DeviceReport, EvalReport, Join, RoundTask, Update
from fedpeft_edge.protocol.keys import STATUS_BUDGET_EXHAUSTED, STATUS_ONLINE
from fedpeft_edge.training import LocalTrainer, evaluate, resolve_device
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    """Who this device is in the run and where its data comes from."""

    device_id: str
    client_index: int | None  # None: the device's own local data set (deployment)


class DeviceAgent:
    """Loads the backbone and applies the PEFT method ONCE; then serves rounds by swapping PEFT tensors."""

    def __init__(self, cfg: RunConfig, identity: AgentIdentity) -> None:
        t0 = time.perf_counter()
        self.identity = identity
        self._train_args = cfg.train_args
        self._comm = cfg.comm_args
        self._dp = cfg.dp_args
        self._slowdown = cfg.device_args.slowdown_factor
        if cfg.device_args.num_threads:
            torch.set_num_threads(cfg.device_args.num_threads)
        self.device = resolve_device(cfg.device_args.device)
        # The run's seed, not the device's: randomly initialised frozen tensors must be identical on every
        # device and on the server, or the backbone fingerprints differ.
        torch.manual_seed(cfg.common_args.random_seed)
        backbone = build_backbone(cfg.model_args)
        self.input_spec = backbone.data_config
        self.method = build_method(cfg.peft_args)
        self.model = self.method.apply(backbone.model).to(self.device)
        torch.manual_seed(cfg.common_args.random_seed * 1_000_003 + (identity.client_index or 0))
        self.manifest = self.method.manifest(self.model)
        self.fingerprint = fingerprint_backbone(self.model, self.manifest)
        self.data = self._load_data(cfg)
        self.privatizer = self._build_privatizer(cfg)
        self.trainer = LocalTrainer(self.model, cfg.train_args, self.device, self.data.train_loader,
                                    privatizer=self.privatizer)
        self.monitor = ResourceMonitor(cfg.device_args.metering_interval_s)
        self.onnx = self._build_onnx_evaluator(cfg)
        self.profile = collect_device_profile()
        self.profile["inference_latency_ms"] = self._measure_latency(cfg)
        self.profile["eval_backend"] = cfg.device_args.eval_backend
        self.profile["startup_s"] = round(time.perf_counter() - t0, 3)
        self.exhausted = bool(self.privatizer is not None and self.privatizer.ledger.exhausted)
        log.info("agent %s ready in %.1fs: %s, method %s (%d shared params), %d local samples",
                 identity.device_id, time.perf_counter() - t0, backbone.name, self.manifest.method,
                 self.manifest.num_params, self.num_samples)

    # --- set-up -------------------------------------------------------------------------------------------
    def _load_data(self, cfg: RunConfig) -> ClientData:
        if self.identity.client_index is None:
            return build_local_data(cfg.data_args, self.input_spec, cfg.common_args.random_seed)
        return build_client_data(cfg.data_args, self.input_spec, cfg.train_args.client_num_in_total,
                                 cfg.common_args.random_seed, self.identity.client_index)

    def _build_privatizer(self, cfg: RunConfig) -> Any:
        if not cfg.dp_args.enabled:
            return None
        from fedpeft_edge.privacy import build_privatizer, ledger_path_for

        state_dir = cfg.device_args.state_dir
        ledger = ledger_path_for(f"{state_dir}/{self.identity.device_id}" if state_dir else None)
        return build_privatizer(
            cfg.dp_args,
            sample_size=len(self.data.train_labels),
            batch_size=cfg.data_args.batch_size,
            epochs_per_round=cfg.train_args.epochs,
            planned_rounds=cfg.train_args.comm_round,
            ledger_path=ledger,
            max_steps_per_round=cfg.train_args.max_steps,
        )

    def _build_onnx_evaluator(self, cfg: RunConfig) -> Any:
        if cfg.device_args.eval_backend != "onnxruntime":
            return None
        try:
            from fedpeft_edge.export.inference import OnnxEvaluator
        except ImportError as exc:
            raise ConfigError(
                f"device_args.eval_backend='onnxruntime' needs the onnx extra ({exc}); "
                "pip install 'fedpeft-edge[onnx]' or set eval_backend: torch"
            ) from exc

        return OnnxEvaluator(self.model, self.input_spec, num_threads=cfg.device_args.num_threads,
                             method=self.method, image_size=cfg.data_args.image_size)

    def _measure_latency(self, cfg: RunConfig) -> dict[str, Any] | None:
        """Batch-1 latency of the exported model on this device (median over runs), for the profile."""
        if not cfg.device_args.measure_latency:
            return None
        try:
            from fedpeft_edge.export.inference import OnnxEvaluator
        except ImportError as exc:  # an agent-only install without the onnx extra
            log.warning("no ONNX inference latency in the device profile: %s (pip install 'fedpeft-edge[onnx]')",
                        exc)
            return None

        try:
            evaluator = self.onnx or OnnxEvaluator(self.model, self.input_spec,
                                                   num_threads=cfg.device_args.num_threads, method=self.method,
                                                   image_size=cfg.data_args.image_size)
            return dict(evaluator.latency(runs=cfg.device_args.latency_runs))
        except FedPeftError as exc:
            log.warning("cannot measure ONNX inference latency on this device: %s", exc)
            return None

    @property
    def num_samples(self) -> int:
        return len(self.data.train_labels)

    def epsilon(self) -> float | None:
        return None if self.privatizer is None else float(self.privatizer.epsilon())

    # --- protocol -----------------------------------------------------------------------------------------
    def join(self) -> Join:
        """What the device announces at join (and again after every reconnect)."""
        return Join(
            sender=self.identity.device_id,
            client_idx=self.identity.client_index,
            backbone_fingerprint=self.fingerprint,
            manifest_hash=self.manifest.hash,
            manifest=self.manifest.to_json(),
            num_samples=self.num_samples,
            profile=self.profile,
            data_stats=self.data.stats(),
            epsilon=self.epsilon(),
            client_status=STATUS_BUDGET_EXHAUSTED if self.exhausted else STATUS_ONLINE,
        )

    def load_global(self, blob: bytes | memoryview, manifest_hash: str | None) -> dict[str, torch.Tensor]:
        """Decode the global tensors (hash checked first) and write them into the model."""
        if manifest_hash is not None and manifest_hash != self.manifest.hash:
            raise ProtocolError(
                f"server sent tensors for manifest {manifest_hash[:12]}, this device runs {self.manifest.hash[:12]}"
                f" ({self.manifest.method}); run the agent with the server's config"
            )
        state = decode_tensors(blob, self.manifest, self.manifest.hash, self._comm.max_update_bytes, copy=True)
        self.method.set_state(self.model, state)
        return state

    def train_round(self, task: RoundTask) -> Update:
        """Set the global tensors, train locally, and return the update with what the device measured.

        With `task.evaluate` the received global model is first evaluated on the local test split.
        """
        if self.exhausted:
            raise BudgetExhaustedError(f"device {self.identity.device_id} has spent its privacy budget")
        if self.privatizer is not None:
            self.privatizer.check_budget()  # refuse before training, not after spending budget on it
        t0 = time.perf_counter()
        global_state = self.load_global(task.blob, task.manifest_hash)
        t_loaded = time.perf_counter()
        global_eval = self.evaluate_local() if task.evaluate else None
        with self.monitor.measure() as meas:
            result = self.trainer.train(epochs=self._train_args.epochs, max_steps=self._train_args.max_steps)
        self._slow_down(time.perf_counter() - t_loaded)
        resources = meas.summary()
        local = self.method.get_state(self.model)
        if self._train_args.send_delta:
            local = {k: v - global_state[k] for k, v in local.items()}
        t_enc = time.perf_counter()
        out_blob = encode_tensors(local, self.manifest, self._comm.encoding)
        encode_s = time.perf_counter() - t_enc
        epsilon = None
        if self.privatizer is not None:
            epsilon = float(self.privatizer.end_round(task.round))
        report = DeviceReport(
            train_loss=result.loss,
            train_acc=result.accuracy,
            steps=result.steps,
            samples_seen=result.samples,
            train_s=result.wall_s,
            set_state_s=t_loaded - t0,
            encode_s=encode_s,
            images_per_s=result.samples / result.wall_s if result.wall_s > 0 else None,
            epsilon=epsilon,
            resources=resources,
            global_eval=global_eval,
        )
        return Update(
            sender=self.identity.device_id, round=task.round, num_samples=self.num_samples, blob=out_blob,
            report=report, manifest_hash=self.manifest.hash, encoding=self._comm.encoding,
            is_delta=self._train_args.send_delta, model_version=task.model_version,
        )

    def _slow_down(self, train_s: float) -> None:
        """device_args.slowdown_factor (tests only): sleep so local training takes factor x as long."""
        factor = self._slowdown
        if factor > 1.0:
            time.sleep((factor - 1.0) * train_s)

    def evaluate_local(self) -> EvalReport | None:
        """Top-1 and loss of the current model on this device's local test split (torch or onnxruntime)."""
        if not len(self.data.test_labels):
            return None
        t0 = time.perf_counter()
        if self.onnx is not None:
            self.onnx.refresh(self.model)
            res = self.onnx.evaluate(self.data.test_loader)
        else:
            res = evaluate(self.model, self.data.test_loader, self.device)
        return EvalReport(loss=res.loss, top1=res.top1, samples=res.samples,
                          backend="onnxruntime" if self.onnx is not None else "torch",
                          eval_s=time.perf_counter() - t0)
