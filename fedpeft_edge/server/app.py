"""The server's parts for one run: backbone + method (for the fingerprint, manifest and evaluation), strategy,
run log, checkpoints, evaluator and meter, wired into a RoundEngine and bound to the transport.

All state changes happen on the receive loop's thread (FedML's `run()`): paho's thread only queues bytes,
and deadlines arrive as local timer messages, so no lock guards the round state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone
from fedpeft_edge.config import RunConfig, dump_config, load_config
from fedpeft_edge.errors import CheckpointError, FedPeftError
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.peft import build_method
from fedpeft_edge.rundir import CLASSES_FILE, refuse_reuse
from fedpeft_edge.server.engine import RoundEngine, RunSpec
from fedpeft_edge.server.manager import ServerManager
from fedpeft_edge.server.ports import DirCheckpoints, MeterTraffic, SystemClock, ThreadTimers, TimerScheduler
from fedpeft_edge.server.runlog import RunLog
from fedpeft_edge.server.strategy import build_strategy
from fedpeft_edge.server.strategy.merge import with_plan
from fedpeft_edge.training import evaluate, resolve_device
from fedpeft_edge.transport.manager import BackendFactory
from fedpeft_edge.wire.limits import receive_limits

log = logging.getLogger(__name__)


class ModelEvaluator:
    """The global tensors on the server's held-out test set (the method's model, built once)."""

    def __init__(self, method: Any, model: torch.nn.Module, loader: Any, device: torch.device,
                 groups: Mapping[str, Any] | None = None, language_model: bool = False) -> None:
        self.method, self.model, self.loader, self.device = method, model, loader, device
        # a causal LM's held-out text per category: evaluated per group (each row once), overall = their sum
        self.groups = dict(groups or {})
        self.language_model = language_model

    @property
    def available(self) -> bool:
        return self.loader is not None

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        if self.loader is None:
            return None
        self.method.set_state(self.model, dict(state))
        if not self.groups:
            res = evaluate(self.model, self.loader, self.device)
            return _eval_record(res.loss, res.top1, res.samples, self.language_model)
        per = {name: evaluate(self.model, loader, self.device) for name, loader in self.groups.items()}
        n = sum(r.samples for r in per.values())
        loss = sum(r.loss * r.samples for r in per.values() if r.samples) / max(n, 1)
        top1 = sum(r.top1 * r.samples for r in per.values() if r.samples) / max(n, 1)
        out = _eval_record(loss, top1, n, self.language_model)
        out["per_category"] = {name: _eval_record(r.loss, r.top1, r.samples, self.language_model)
                               for name, r in per.items()}
        return out


def _eval_record(loss: float, top1: float, samples: int, language_model: bool) -> dict[str, Any]:
    """{loss, top1, samples}, and for a causal LM its perplexity exp(loss) (top1 is next-token accuracy)."""
    out: dict[str, Any] = {"loss": loss, "top1": top1, "samples": samples}
    if language_model:
        out["perplexity"] = math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.inf
    return out


@dataclasses.dataclass(frozen=True)
class ServerModel:
    """The server's model: the backbone with the method applied, its input spec, and (when the process has
    it already) the data source its test set comes from."""

    method: Any
    model: torch.nn.Module
    input_spec: Any
    device: torch.device
    source: Any = None


def build_server_model(cfg: RunConfig) -> ServerModel:
    """The server's own backbone + method, seeded as every device's (the same frozen tensors: fingerprint)."""
    if cfg.device_args.num_threads:
        torch.set_num_threads(cfg.device_args.num_threads)
    device = resolve_device(cfg.device_args.device)
    torch.manual_seed(cfg.common_args.random_seed)
    backbone = build_backbone(cfg.model_args, image_size=cfg.data_args.image_size)
    method = build_method(cfg.peft_args)
    return ServerModel(method, method.apply(backbone.model).to(device), backbone.data_config, device)


def build_engine(cfg: RunConfig, run_dir: str | Path, resume: bool, meter: BandwidthMeter,
                 timers: TimerScheduler, bytes_kind: str = "wire", model: ServerModel | None = None) -> RoundEngine:
    """The round engine of a run, with the server's model (its own unless given), strategy, run log,
    checkpoints and evaluator."""
    run_dir = Path(run_dir)
    parts = model if model is not None else build_server_model(cfg)
    method = parts.method
    manifest = method.manifest(parts.model)
    fingerprint = fingerprint_backbone(parts.model, manifest)
    if resume:
        _check_resumable(run_dir, manifest.hash, fingerprint)
    else:
        refuse_reuse(run_dir, cfg.common_args.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluator, class_names = _build_evaluator(cfg, parts)
    shapes = method.shape_plan(manifest)  # per-device shapes and merge (LoRA flexlora); else the plain manifest
    spec = RunSpec.from_config(cfg, manifest, fingerprint, bytes_kind, class_names)
    if evaluator.language_model:  # chance level (divergence warnings) is over the vocabulary, not num_classes
        spec = dataclasses.replace(spec, num_classes=int(parts.input_spec.vocab_size))
    engine = RoundEngine(
        spec, method.get_state(parts.model), with_plan(build_strategy(spec.train_args), shapes),
        clock=SystemClock(), timers=timers, runlog=RunLog(run_dir),
        checkpoints=DirCheckpoints(run_dir, manifest, fingerprint, cfg.common_args.run_id),
        evaluator=evaluator, traffic=MeterTraffic(meter), shapes=shapes,
    )
    return engine


def start_run_dir(engine: RoundEngine, cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Once the server is connected: a new run writes its config.yaml, a resumed one rolls its records back to
    its checkpoint. Nothing is written into the directory before (a server that cannot connect leaves it as
    it was)."""
    if resume:
        engine.resume()
        return
    dump_config(cfg, run_dir / "config.yaml")
    if engine.spec.class_names is not None:  # the run's label order, for exports and reports
        (run_dir / CLASSES_FILE).write_text(json.dumps(list(engine.spec.class_names)) + "\n", encoding="utf-8")


def _build_evaluator(cfg: RunConfig, parts: ServerModel) -> tuple[ModelEvaluator, tuple[str, ...] | None]:
    """The held-out evaluator and the run's class list (image runs; a text run's categories are not labels);
    a causal LM's held-out text is evaluated per category of its source."""
    language_model = getattr(parts.input_spec, "task", None) == "causal_lm"
    loader, class_names, source = _server_data(cfg, parts.input_spec, parts.source)
    groups: dict[str, Any] = {}
    if language_model and loader is not None and source is not None:
        from fedpeft_edge.llm.data import category_loaders

        groups = category_loaders(loader, source.class_names)
    if cfg.model_args.family != "image":
        class_names = None
    return ModelEvaluator(parts.method, parts.model, loader, parts.device, groups, language_model), class_names


def _server_data(cfg: RunConfig, input_spec: Any, source: Any) -> tuple[Any, tuple[str, ...] | None, Any]:
    """The server's test loader (None without data), the run's class list (data_args.class_names, else the
    server's data's classes; None when neither is known: devices' labels are then not checked by name) and the
    data source it read (None without data)."""
    from fedpeft_edge.data import build_server_test_loader, load_source

    names = cfg.data_args.class_names
    try:
        source = source if source is not None else load_source(cfg.data_args)
    except FedPeftError as exc:
        log.warning("no server-side evaluation: %s", exc)
        source = None
    if names is None and source is not None:
        names = tuple(source.class_names)
        if len(names) != cfg.model_args.num_classes:
            log.warning("the server's data has %d classes but model_args.num_classes=%d: its class list is not "
                        "sent to devices; set data_args.class_names", len(names), cfg.model_args.num_classes)
            names = None
    if names is None and cfg.model_args.family == "image":
        log.warning("no class list for this run (set data_args.class_names, or give the server the data): devices' "
                    "class folders are not mapped by name")
    if source is None:
        return None, names, None
    try:
        return build_server_test_loader(cfg.data_args, input_spec, cfg.common_args.random_seed, source), names, source
    except FedPeftError as exc:
        log.warning("no server-side evaluation: %s", exc)
        return None, names, source


def _check_resumable(run_dir: Path, manifest_hash: str, fingerprint: str) -> None:
    from fedpeft_edge.server.checkpoint import load_checkpoint

    ck = load_checkpoint(run_dir)
    if ck.manifest_hash != manifest_hash or ck.fingerprint != fingerprint:
        raise CheckpointError(
            f"checkpoint of {run_dir} was written for manifest {ck.manifest_hash[:12]} / backbone "
            f"{ck.fingerprint[:12]}, this server builds {manifest_hash[:12]} / {fingerprint[:12]};"
            " resume with the run's own config.yaml"
        )


class ServerApp(ServerManager):
    """One federated run over MQTT, from the first join to FINISH; `resume` continues from the last checkpoint."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                 backend: BackendFactory | None = None, bytes_kind: str = "wire",
                 model: ServerModel | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        meter = BandwidthMeter()
        timers = ThreadTimers()
        engine = build_engine(cfg, self.run_dir, resume, meter, timers, bytes_kind, model)
        comm = receive_limits(cfg.comm_args, engine.spec.manifest)  # bounds from the manifest, not gigabytes
        if comm.replay_journal_file is None and (comm.peer_keys_dir or comm.require_signatures):
            comm = dataclasses.replace(comm, replay_journal_file=str(self.run_dir / "replay.journal"))
        super().__init__(engine, timers, comm, cfg.common_args.run_id, meter, backend=backend)
        start_run_dir(engine, cfg, self.run_dir, resume)


def load_server_config(config: str | Sequence[str] | None, resume: str | None) -> tuple[RunConfig, Path]:
    """The config to run (a resumed run uses its own saved config.yaml) and the run directory."""
    if resume:
        run_dir = Path(resume)
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise CheckpointError(f"{run_dir} holds no config.yaml; pass the directory of an earlier server run")
        return load_config(saved), run_dir
    if not config:
        raise CheckpointError("pass --config CONFIG.yaml for a new run or --resume RUN_DIR to continue one")
    cfg = load_config(config)
    return cfg, Path(cfg.tracking_args.run_dir) / cfg.common_args.run_id
