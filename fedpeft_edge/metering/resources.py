"""On-device resource and energy metering of one round's local training, sampled in a background thread.

`ResourceMonitor(interval_s, sources)` wraps a round: `with monitor.measure() as m: train(); m.summary()`.
A source reports only what its hardware gave; a sensor that is absent leaves its keys `None` ("not
available"), never 0. Sources: psutil process and system counters (always), CUDA memory, psutil
temperatures and battery, Jetson `tegrastats` lines, Jetson INA3221 sysfs rails, Intel RAPL powercap
counters and NVIDIA NVML (discrete GPUs, optional `nvidia-ml-py`). Each takes explicit times so tests
can drive it with recorded lines and fake sysfs trees.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Protocol

import psutil

from fedpeft_edge.errors import MeteringError

log = logging.getLogger(__name__)

MB = 1024.0 * 1024.0

#: Every key a summary holds; absent sensors keep `None`.
SUMMARY_KEYS: tuple[str, ...] = (
    "wall_s", "cpu_s", "cpu_util_pct", "sys_cpu_pct_mean", "samples", "interval_s",
    "rss_mean_mb", "rss_peak_mb", "sys_mem_used_mean_mb", "sys_mem_used_peak_mb", "sys_mem_total_mb",
    "gpu_mem_peak_allocated_mb", "gpu_mem_peak_reserved_mb", "gpu_load_mean_pct", "emc_load_mean_pct",
    "temperatures_max_c", "battery_pct_start", "battery_pct_end", "battery_plugged",
    "energy_j", "energy_source", "energy_basis", "energy_rails_j", "power_mean_w", "power_peak_w",
    "net_bytes_sent", "net_bytes_recv", "net_loopback_bytes",
    "gpu_energy_j", "gpu_power_mean_w", "gpu_energy_basis",
)

#: Which rails make a Jetson board's total, by family (the first rule whose rails are all present wins).
#: - Nano (L4T R32): POM_5V_IN, the module's 5 V input.
#: - TX1/TX2/TX2 NX, Xavier NX, Orin Nano/NX: VDD_IN, the module's input.
#: - AGX Orin: no input rail; the INA3221 at 0x40 measures the module's three supplies VDD_GPU_SOC,
#:   VDD_CPU_CV and VIN_SYS_5V0; VDDQ_VDD2_1V8AO (0x41) is fed from VIN_SYS_5V0 and is left out (no double count).
#: - Anything else (AGX Xavier's GPU/CPU/SOC/CV/VDDRQ/SYS5V, unknown boards): the sum of every measured rail.
#: None of these include the carrier board, fans or USB peripherals.
TOTAL_RAIL_RULES: tuple[tuple[str, ...], ...] = (
    ("VDD_IN",),
    ("POM_5V_IN",),
    ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
)
#: Kept for callers of the single-rail rule.
TOTAL_INPUT_RAILS: tuple[str, ...] = ("VDD_IN", "POM_5V_IN")


class Source(Protocol):
    """One sensor family. `begin` opens a round, `sample` is called from the sampling thread, `end` closes
    the round and returns summary keys (a subset of SUMMARY_KEYS; None where the sensor gave nothing)."""

    name: str

    def begin(self, t: float) -> None: ...

    def sample(self, t: float) -> None: ...

    def end(self, t: float) -> dict[str, Any]: ...


# --- power integration, shared by tegrastats, INA3221 -------------------------------------------------------


class PowerIntegrator:
    """Trapezoidal integral of power samples (watts at monotonic seconds) per rail, in joules."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}
        self.joules: dict[str, float] = {}
        self.peak_w: dict[str, float] = {}
        self.total_peak_w: dict[tuple[str, ...], float] = {}  # peak of the summed total, per rail set
        self.first_t: float | None = None
        self.last_t: float | None = None

    def add(self, t: float, watts: Mapping[str, float]) -> None:
        for rail, w in watts.items():
            prev = self._last.get(rail)
            if prev is not None and t > prev[0]:
                self.joules[rail] = self.joules.get(rail, 0.0) + 0.5 * (w + prev[1]) * (t - prev[0])
            self.joules.setdefault(rail, 0.0)
            self.peak_w[rail] = max(self.peak_w.get(rail, w), w)
            self._last[rail] = (t, w)
        chosen, _basis = total_rails(list(watts))
        if all(r in watts for r in chosen):
            total = sum(watts[r] for r in chosen)
            self.total_peak_w[chosen] = max(self.total_peak_w.get(chosen, total), total)
        self.first_t = t if self.first_t is None else self.first_t
        self.last_t = t

    @property
    def span_s(self) -> float:
        return 0.0 if self.first_t is None or self.last_t is None else self.last_t - self.first_t


def total_rails(rails: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """The rails whose sum is the board's total (TOTAL_RAIL_RULES, else all of them) and a human basis."""
    present = set(rails)
    for rule in TOTAL_RAIL_RULES:
        if present.issuperset(rule):
            if len(rule) == 1:
                return rule, f"input rail {rule[0]}"
            return rule, "module supplies " + "+".join(rule)
    return tuple(sorted(present)), "sum of measured rails " + "+".join(sorted(present))


def total_rail(rails: Sequence[str]) -> tuple[str | None, str]:
    """The single rail that measures the whole input, or None when the total is a sum; and the basis."""
    chosen, basis = total_rails(rails)
    return (chosen[0] if len(chosen) == 1 and basis.startswith("input rail") else None), basis


def energy_summary(integ: PowerIntegrator, source: str) -> dict[str, Any]:
    """energy_* and power_* keys from an integrator; all None when it holds fewer than two samples.

    The peak is the largest per-rail peak sum, an upper bound of the total's peak when it sums rails."""
    if integ.span_s <= 0 or not integ.joules:
        return {}
    chosen, basis = total_rails(list(integ.joules))
    joules = sum(integ.joules[r] for r in chosen)
    return {
        "energy_j": joules, "energy_source": source, "energy_basis": basis,
        "energy_rails_j": dict(integ.joules), "power_mean_w": joules / integ.span_s,
        "power_peak_w": integ.total_peak_w.get(chosen, sum(integ.peak_w[r] for r in chosen)),
    }


# --- psutil: process, system memory, CPU, network -----------------------------------------------------------


class ProcessSource:
    """RSS, process CPU time, system CPU and memory, interface bytes: psutil, on every platform."""

    name = "process"

    def __init__(self, pid: int | None = None) -> None:
        self._proc = psutil.Process(pid)
        self._own = pid is None or pid == os.getpid()
        self._sys_total_mb = psutil.virtual_memory().total / MB
        self._rss: list[float] = []
        self._sys_used: list[float] = []
        self._sys_cpu: list[float] = []
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._net0: dict[str, Any] = {}

    def begin(self, t: float) -> None:
        self._rss, self._sys_used, self._sys_cpu = [], [], []
        self._t0 = t
        self._cpu0 = self._cpu_seconds()
        self._net0 = _net_counters()
        psutil.cpu_percent(interval=None)  # primes the system-wide counter
        self.sample(t)

    def sample(self, t: float) -> None:
        self._rss.append(self._proc.memory_info().rss / MB)
        self._sys_used.append(_sys_used_mb())
        if t > self._t0:
            self._sys_cpu.append(psutil.cpu_percent(interval=None))

    def end(self, t: float) -> dict[str, Any]:
        self.sample(t)
        wall = max(t - self._t0, 0.0)
        cpu = self._cpu_seconds() - self._cpu0
        net = _net_delta(self._net0, _net_counters())
        return {
            "wall_s": wall, "cpu_s": cpu, "cpu_util_pct": 100.0 * cpu / wall if wall > 0 else None,
            "sys_cpu_pct_mean": _mean(self._sys_cpu),
            "rss_mean_mb": _mean(self._rss), "rss_peak_mb": max(self._rss),
            "sys_mem_used_mean_mb": _mean(self._sys_used), "sys_mem_used_peak_mb": max(self._sys_used),
            "sys_mem_total_mb": self._sys_total_mb, **net,
        }

    def _cpu_seconds(self) -> float:
        """User + system CPU of the process; for our own, the process CPU clock (ns resolution, ~1 us: psutil
        parses /proc/<pid>/stat, in clock ticks, and its kernel side walks every thread of a fleet host)."""
        return time.process_time() if self._own else _cpu_seconds(self._proc)


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _sys_used_mb() -> float:
    vm = psutil.virtual_memory()
    return float(vm.total - vm.available) / MB


def _net_counters() -> dict[str, Any]:
    try:
        return dict(psutil.net_io_counters(pernic=True))
    except (OSError, RuntimeError):  # some containers hide /proc/net/dev
        return {}


def _net_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    if not before or not after:
        return {}
    sent = recv = lo = 0
    for nic, now in after.items():
        then = before.get(nic)
        if then is None:
            continue
        if nic == "lo" or nic.startswith("lo"):
            lo += now.bytes_sent - then.bytes_sent
        else:
            sent += now.bytes_sent - then.bytes_sent
            recv += now.bytes_recv - then.bytes_recv
    return {"net_bytes_sent": sent, "net_bytes_recv": recv, "net_loopback_bytes": lo}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --- CUDA ---------------------------------------------------------------------------------------------------


class CudaMemorySource:
    """Peak allocated and reserved memory of one CUDA device over the round (torch's own counters)."""

    name = "cuda"

    def __init__(self, device: Any = None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise MeteringError("CudaMemorySource needs a CUDA device; torch.cuda.is_available() is False")
        self._torch = torch
        self._device = device

    def begin(self, t: float) -> None:
        self._torch.cuda.reset_peak_memory_stats(self._device)

    def sample(self, t: float) -> None:
        return None

    def end(self, t: float) -> dict[str, Any]:
        cuda = self._torch.cuda
        return {
            "gpu_mem_peak_allocated_mb": cuda.max_memory_allocated(self._device) / MB,
            "gpu_mem_peak_reserved_mb": cuda.max_memory_reserved(self._device) / MB,
        }


# --- temperatures and battery -------------------------------------------------------------------------------


class ThermalSource:
    """Max temperature per sensor and battery level (psutil), read at most every `min_period_s`.

    The period holds across measurements too: a window shorter than it (a fleet's devices train for
    milliseconds each, one after another) takes the latest reading, at most `min_period_s` old, instead of
    globbing every hwmon sensor twice per window (~0.25 ms)."""

    name = "thermal"

    def __init__(self, min_period_s: float = 1.0) -> None:
        self._period = min_period_s
        self._read_at: float | None = None
        self._latest: dict[str, float] = {}
        self._battery: Any = None
        self._temps: dict[str, float] = {}
        self._battery0: Any = None

    def begin(self, t: float) -> None:
        self._temps = {}
        self._read(t)
        self._battery0 = self._battery
        self._fold()

    def sample(self, t: float) -> None:
        if self._read(t):
            self._fold()

    def end(self, t: float) -> dict[str, Any]:
        self.sample(t)
        battery1 = self._battery
        return {
            "temperatures_max_c": dict(self._temps) or None,
            "battery_pct_start": None if self._battery0 is None else float(self._battery0.percent),
            "battery_pct_end": None if battery1 is None else float(battery1.percent),
            "battery_plugged": None if battery1 is None else battery1.power_plugged,
        }

    def _read(self, t: float) -> bool:
        """Read the sensors if the latest reading is older than the period (or from a later clock)."""
        if self._read_at is not None and 0.0 <= t - self._read_at < self._period:
            return False
        self._read_at = t
        self._latest = _temperatures()
        self._battery = read_battery()
        return True

    def _fold(self) -> None:
        for name, celsius in self._latest.items():
            self._temps[name] = max(self._temps.get(name, celsius), celsius)


def _temperatures() -> dict[str, float]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    out: dict[str, float] = {}
    try:
        groups = reader()
    except (OSError, RuntimeError):
        return {}
    for group, entries in groups.items():
        for i, entry in enumerate(entries):
            if entry.current is not None and entry.current > -100:
                out[f"{group}/{entry.label or i}"] = float(entry.current)
    return out


def read_battery() -> Any:
    """psutil's battery reading (.percent, .power_plugged), or None on a machine without a battery."""
    reader = getattr(psutil, "sensors_battery", None)
    try:
        return reader() if reader else None
    except (OSError, RuntimeError):
        return None


# --- Jetson tegrastats --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TegraSample:
    """One tegrastats line. Rails in mW (instantaneous, not the running average); temps in Celsius."""

    ram_used_mb: float | None
    ram_total_mb: float | None
    cpu_loads_pct: tuple[float | None, ...]  # None for a core that is off
    gpu_load_pct: float | None
    emc_load_pct: float | None
    temperatures_c: dict[str, float]
    rails_mw: dict[str, float]


_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
# Rails, upper-case names, instantaneous value first: "VDD_IN 4888/4888" (L4T R32: instant/average, mW
# implied), "VDD_IN 2763mW/2846mW" (R35+), "VDD_GPU_SOC 5139mW/5139mW/5139mW" (R36 on AGX Orin:
# instant/average/max).
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM", "NC"})


def parse_tegrastats_line(line: str) -> TegraSample:
    """Parse one tegrastats line from any L4T release (Nano, TX2, Xavier, Orin); MeteringError if it is not
    one. Temperatures of -256C (sensor absent on this module) and rails named NC are left out."""
    ram = _RAM.search(line)
    rails = {m.group(1): float(m.group(2)) for m in _RAIL.finditer(line) if m.group(1) not in _NOT_RAILS}
    if ram is None and not rails:
        raise MeteringError(f"not a tegrastats line (no RAM field and no power rail): {line[:120]!r}")
    temps = {m.group(1): float(m.group(2)) for m in _TEMP.finditer(line) if float(m.group(2)) > -100}
    return TegraSample(
        ram_used_mb=float(ram.group(1)) if ram else None,
        ram_total_mb=float(ram.group(2)) if ram else None,
        cpu_loads_pct=_cpu_loads(line),
        gpu_load_pct=_group_float(_GPU, line),
        emc_load_pct=_group_float(_EMC, line),
        temperatures_c=temps,
        rails_mw=rails,
    )


def _cpu_loads(line: str) -> tuple[float | None, ...]:
    m = _CPU.search(line)
    if m is None:
        return ()
    loads: list[float | None] = []
    for core in m.group(1).split(","):
        pct = re.match(r"\s*(\d+)%", core)
        loads.append(float(pct.group(1)) if pct else None)
    return tuple(loads)


def _group_float(pattern: re.Pattern[str], line: str) -> float | None:
    m = pattern.search(line)
    return float(m.group(1)) if m else None


class TegrastatsSource:
    """Runs `tegrastats` (or any command printing its lines, e.g. a replay of a recorded log) for the
    round and integrates its power rails; also GPU (GR3D) and EMC load and temperatures."""

    name = "tegrastats"

    def __init__(self, command: Sequence[str] | None = None, interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.command = list(command) if command else ["tegrastats", "--interval", str(int(interval_s * 1000))]
        self._clock = clock
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self.integrator = PowerIntegrator()
        self._gpu: list[float] = []
        self._emc: list[float] = []
        self._temps: dict[str, float] = {}
        self.bad_lines = 0

    def feed(self, line: str, t: float) -> None:
        """Account one line received at monotonic time t (public so recorded logs can be replayed)."""
        try:
            s = parse_tegrastats_line(line)
        except MeteringError:
            self.bad_lines += 1
            return
        with self._lock:
            self.integrator.add(t, {k: v / 1000.0 for k, v in s.rails_mw.items()})
            if s.gpu_load_pct is not None:
                self._gpu.append(s.gpu_load_pct)
            if s.emc_load_pct is not None:
                self._emc.append(s.emc_load_pct)
            for k, c in s.temperatures_c.items():
                self._temps[k] = max(self._temps.get(k, c), c)

    def begin(self, t: float) -> None:
        self._reset()
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True, bufsize=1)
        except OSError as exc:
            raise MeteringError(
                f"cannot start {self.command[0]!r}: {exc}; install it or leave TegrastatsSource out"
            ) from exc
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True,
                                        name="tegrastats-reader")
        self._reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        if stream is None:
            return
        for line in stream:
            self.feed(line, self._clock())

    def sample(self, t: float) -> None:
        return None

    def end(self, t: float) -> dict[str, Any]:
        self._stop()
        with self._lock:
            out = energy_summary(self.integrator, self.name)
            out["gpu_load_mean_pct"] = _mean(self._gpu)
            out["emc_load_mean_pct"] = _mean(self._emc)
            if self._temps:
                out["temperatures_max_c"] = dict(self._temps)
        return out

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2.0)
        if self._reader is not None:
            self._reader.join(timeout=2.0)
            self._reader = None


# --- Jetson INA3221 sysfs -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _InaRail:
    name: str
    power_mw: Path | None = None  # legacy iio node, mW
    volt_mv: Path | None = None  # hwmon nodes, mV and mA
    curr_ma: Path | None = None

    def read_w(self) -> float:
        if self.power_mw is not None:
            return _read_number(self.power_mw) / 1000.0
        if self.volt_mv is None or self.curr_ma is None:
            raise MeteringError(f"INA3221 rail {self.name} has no power, voltage or current node")
        return _read_number(self.volt_mv) * _read_number(self.curr_ma) / 1e6


def find_ina3221_rails(root: str | Path = "/sys/bus/i2c/drivers") -> list[_InaRail]:
    """INA3221 rails under an i2c drivers root: legacy `ina3221x/*/iio:device*/rail_name_N` with
    `in_powerN_input` (L4T R32) and hwmon `ina3221/*/hwmon/hwmon*/inN_label` (L4T R34+); NC rails skipped."""
    base = Path(root)
    rails: list[_InaRail] = []
    for label in sorted(base.glob("ina3221x/*/iio:device*/rail_name_*")):
        idx = label.name.rsplit("_", 1)[1]
        rails.append(_InaRail(_read_text(label), power_mw=label.parent / f"in_power{idx}_input"))
    for label in sorted(base.glob("ina3221/*/hwmon/hwmon*/in*_label")):
        idx = label.name[2:-len("_label")]
        rails.append(_InaRail(_read_text(label), volt_mv=label.parent / f"in{idx}_input",
                              curr_ma=label.parent / f"curr{idx}_input"))
    return [r for r in rails if r.name and r.name.upper() != "NC"]


class Ina3221Source:
    """Integrates the INA3221 power rails of a Jetson module from sysfs at every sample."""

    name = "ina3221"

    def __init__(self, root: str | Path = "/sys/bus/i2c/drivers") -> None:
        self.root = Path(root)
        self.rails = find_ina3221_rails(self.root)
        if not self.rails:
            raise MeteringError(
                f"no INA3221 rails under {self.root}; this is not a Jetson or its ina3221 driver is off"
            )
        self.integrator = PowerIntegrator()

    def begin(self, t: float) -> None:
        self.integrator = PowerIntegrator()
        self.sample(t)

    def sample(self, t: float) -> None:
        try:
            self.integrator.add(t, {r.name: r.read_w() for r in self.rails})
        except (OSError, ValueError, MeteringError) as exc:
            log.debug("INA3221 read failed: %s", exc)

    def end(self, t: float) -> dict[str, Any]:
        self.sample(t)
        return energy_summary(self.integrator, self.name)


# --- Intel RAPL powercap ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _RaplZone:
    name: str
    energy_path: Path
    max_range_uj: int
    last_uj: int = 0
    joules: float = 0.0


def find_rapl_zones(root: str | Path = "/sys/class/powercap") -> list[_RaplZone]:
    """Readable top-level RAPL zones (`intel-rapl:N`; sub-zones are parts of their package)."""
    zones = []
    for zdir in sorted(Path(root).glob("intel-rapl:*")):
        if zdir.name.count(":") != 1:
            continue
        try:
            name = _read_text(zdir / "name")
            max_range = int(_read_number(zdir / "max_energy_range_uj"))
            _read_number(zdir / "energy_uj")
        except (OSError, ValueError) as exc:  # energy_uj is root-only since Linux 5.10
            log.debug("RAPL zone %s not readable: %s", zdir, exc)
            continue
        zones.append(_RaplZone(name=name, energy_path=zdir / "energy_uj", max_range_uj=max_range))
    return zones


class RaplSource:
    """Energy counters of Intel/AMD RAPL zones, wrap-around corrected; total = `psys` (whole platform)
    when the machine has it, else the sum of the package zones."""

    name = "rapl"

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)
        self.zones = find_rapl_zones(self.root)
        if not self.zones:
            raise MeteringError(f"no readable RAPL zone under {self.root}; needs read access to energy_uj")
        self._t0 = 0.0
        self._last_t = 0.0
        self._peak_w = 0.0

    def begin(self, t: float) -> None:
        self._t0 = self._last_t = t
        self._peak_w = 0.0
        for z in self.zones:
            z.last_uj = int(_read_number(z.energy_path))
            z.joules = 0.0

    def sample(self, t: float) -> None:
        step_j = 0.0
        for z in self.zones:
            now = int(_read_number(z.energy_path))
            delta = now - z.last_uj
            if delta < 0:  # the counter wrapped at max_energy_range_uj
                delta += z.max_range_uj
            z.last_uj = now
            z.joules += delta / 1e6
            step_j += delta / 1e6 if self._counts(z) else 0.0
        if t > self._last_t:
            self._peak_w = max(self._peak_w, step_j / (t - self._last_t))
        self._last_t = t

    def _counts(self, zone: _RaplZone) -> bool:
        has_psys = any(z.name == "psys" for z in self.zones)
        return zone.name == "psys" if has_psys else zone.name.startswith("package")

    def end(self, t: float) -> dict[str, Any]:
        self.sample(t)
        counted = [z for z in self.zones if self._counts(z)]
        joules = sum(z.joules for z in counted)
        span = t - self._t0
        return {
            "energy_j": joules, "energy_source": self.name,
            "energy_basis": "RAPL " + "+".join(z.name for z in counted),
            "energy_rails_j": {z.name: z.joules for z in self.zones},
            "power_mean_w": joules / span if span > 0 else None,
            "power_peak_w": self._peak_w or None,
        }


# --- NVIDIA NVML (discrete GPUs) ----------------------------------------------------------------------------


def load_nvml() -> Any:
    """The `pynvml` module of nvidia-ml-py, initialised; MeteringError when it or the driver is absent."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise MeteringError("nvidia-ml-py is not installed; pip install 'fedpeft-edge[nvidia]' for GPU power") from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError_LibraryNotFound, _DriverNotLoaded ...
        raise MeteringError(f"NVML did not initialise ({exc}); no NVIDIA driver on this machine") from exc
    return pynvml


class NvmlSource:
    """GPU board power of one discrete NVIDIA GPU through NVML: the driver's total energy counter (mJ,
    Volta and newer) when it has one, else the trapezoidal integral of power readings (mW). GPU only:
    the host's CPU and memory are not in it (RAPL measures those)."""

    name = "nvml"

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        self._nvml = nvml if nvml is not None else load_nvml()
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            raise MeteringError(f"NVML has no GPU {index} ({exc}); pick an index below nvmlDeviceGetCount()") from exc
        self.index = index
        self.has_counter = self._energy_mj() is not None
        self._e0: float | None = None
        self.integrator = PowerIntegrator()

    def _energy_mj(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:  # NVMLError_NotSupported on pre-Volta boards
            return None

    def _power_w(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0
        except Exception:
            return None

    def begin(self, t: float) -> None:
        self.integrator = PowerIntegrator()
        self._e0 = self._energy_mj() if self.has_counter else None
        self.sample(t)

    def sample(self, t: float) -> None:
        watts = self._power_w()
        if watts is not None:
            self.integrator.add(t, {f"GPU{self.index}": watts})

    def end(self, t: float) -> dict[str, Any]:
        self.sample(t)
        out = energy_summary(self.integrator, self.name)
        e1 = self._energy_mj() if self._e0 is not None else None
        if self._e0 is not None and e1 is not None:
            span = self.integrator.span_s
            joules = (e1 - self._e0) / 1000.0
            out.update({"energy_j": joules, "energy_source": self.name,
                        "energy_basis": f"NVML energy counter of GPU {self.index}",
                        "energy_rails_j": {f"GPU{self.index}": joules},
                        "power_mean_w": joules / span if span > 0 else None})
        elif out:
            out["energy_basis"] = f"NVML power readings of GPU {self.index}, integrated"
        # The GPU's own figures, kept even when another source (RAPL) owns energy_j.
        out["gpu_energy_j"] = out.get("energy_j")
        out["gpu_power_mean_w"] = out.get("power_mean_w")
        out["gpu_energy_basis"] = out.get("energy_basis")
        return out


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip().strip("\x00")


def _read_number(path: Path) -> float:
    return float(_read_text(path))


# --- the monitor --------------------------------------------------------------------------------------------


def default_sources(tegrastats_interval_s: float = 0.1) -> list[Source]:
    """Every source this machine offers: psutil always; CUDA, tegrastats, INA3221, RAPL, NVML when present."""
    sources: list[Source] = [ProcessSource(), ThermalSource()]
    with suppress(MeteringError, ImportError):
        sources.append(CudaMemorySource())
    if shutil.which("tegrastats"):
        sources.append(TegrastatsSource(interval_s=tegrastats_interval_s))
    for cls in (Ina3221Source, RaplSource):
        with suppress(MeteringError, OSError):
            sources.append(cls())
    with suppress(MeteringError):
        sources.append(NvmlSource())
    log.debug("metering sources: %s", [s.name for s in sources])
    return sources


class Measurement:
    """One measured round; `summary()` is valid after the `with` block closes."""

    def __init__(self, sources: Sequence[Source], interval_s: float, clock: Callable[[], float]) -> None:
        self._sources = sources
        self._interval = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0
        self._summary: dict[str, Any] | None = None

    def start(self) -> None:
        t = self._clock()
        for src in self._sources:
            src.begin(t)
        self._thread = threading.Thread(target=self._run, daemon=True, name="resource-monitor")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            t = self._clock()
            for src in self._sources:
                try:
                    src.sample(t)
                except Exception as exc:  # a flaky sensor must not kill the round
                    log.debug("metering source %s failed: %s", src.name, exc)
            self._samples += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        t = self._clock()
        merged: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
        for src in self._sources:
            _merge(merged, src.end(t), src.name)
        merged["samples"] = self._samples
        merged["interval_s"] = self._interval
        self._summary = merged

    def summary(self) -> dict[str, Any]:
        if self._summary is None:
            raise MeteringError("summary() called inside the measure() block; call it after the block ends")
        return dict(self._summary)


def _merge(into: dict[str, Any], part: Mapping[str, Any], source: str) -> None:
    """Fill keys still None; the first energy source that measured something owns all energy keys."""
    if into.get("energy_j") is not None:
        part = {k: v for k, v in part.items() if not (k.startswith("energy") or k.startswith("power"))}
    for key, value in part.items():
        if key not in into:
            log.debug("source %s returned unknown key %s", source, key)
            continue
        if key == "temperatures_max_c" and value and into[key]:
            into[key] = {**into[key], **value}
        elif into[key] is None:
            into[key] = value


class ResourceMonitor:
    """Samples `sources` every `interval_s` in a background thread while a round trains."""

    def __init__(self, interval_s: float = 0.1, *sources: Source,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise MeteringError(f"interval_s must be > 0, got {interval_s!r}; 0.1 samples at 10 Hz")
        self.interval_s = float(interval_s)
        self.sources: list[Source] = list(sources) if sources else default_sources(interval_s)
        self._clock = clock

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Measure the block: `with monitor.measure() as m: train()`, then `m.summary()`."""
        m = Measurement(self.sources, self.interval_s, self._clock)
        m.start()
        try:
            yield m
        finally:
            m.stop()
