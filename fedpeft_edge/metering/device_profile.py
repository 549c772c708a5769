"""A device's static profile (host, OS, CPU, RAM, torch, CUDA, Jetson / L4T), sent once when it joins."""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")


def collect_device_profile(root: str | Path = "/", probe_cuda: bool = True) -> dict[str, Any]:
    """JSON-able static facts about this device; a fact the system does not expose is None.

    `root` prefixes every file read (/proc, /sys, /etc), so tests can point it at a fake tree.
    """
    base = Path(root)
    jetson = _jetson(base)
    profile: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": platform.system(),
        "os_release": platform.release(),
        "os_pretty_name": _os_pretty_name(base),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": _visible_cpus(),
        "cpu_model": _cpu_model(base),
        "ram_total_mb": round(psutil.virtual_memory().total / 2**20, 1),
        "device_model": _device_model(base),
        **_torch_facts(probe_cuda),
        **jetson,
    }
    profile["accelerator"] = _accelerator(profile)
    return profile


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def _os_pretty_name(base: Path) -> str | None:
    text = _read(base / "etc/os-release") or ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.MULTILINE)
    return m.group(1) if m else None


def _cpu_model(base: Path) -> str | None:
    text = _read(base / "proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return platform.processor() or None


def _device_model(base: Path) -> str | None:
    """The board (device tree, ARM) or the product name (DMI, x86)."""
    return _read(base / "proc/device-tree/model") or _read(base / "sys/class/dmi/id/product_name")


def _jetson(base: Path) -> dict[str, Any]:
    release = _read(base / "etc/nv_tegra_release")
    l4t = None
    if release:
        m = _L4T.search(release)
        l4t = f"{m.group(1)}.{m.group(2)}" if m else release.splitlines()[0]
    return {"jetson": release is not None, "l4t_version": l4t,
            "jetpack_version": _jetpack_version() if release else None}


def _jetpack_version() -> str | None:
    """The nvidia-jetpack meta-package version, when dpkg knows it (absent on minimal images)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"], capture_output=True,
                             text=True, timeout=5.0, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("dpkg-query nvidia-jetpack failed: %s", exc)
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _torch_facts(probe_cuda: bool) -> dict[str, Any]:
    facts: dict[str, Any] = {"torch": None, "timm": None, "cuda_available": False, "torch_cuda_build": None,
                             "cuda_device": None, "cuda_mem_total_mb": None, "torch_threads": None}
    try:
        import torch
    except ImportError:
        return facts
    facts.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda,
                 torch_threads=torch.get_num_threads())
    try:
        import timm

        facts["timm"] = timm.__version__
    except ImportError:
        pass
    if probe_cuda and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(cuda_available=True, cuda_device=props.name,
                     cuda_mem_total_mb=round(props.total_memory / 2**20, 1))
    return facts


def _accelerator(profile: dict[str, Any]) -> str:
    if profile["cuda_available"]:
        return f"cuda:{profile['cuda_device']}"
    return f"cpu:{profile['cpu_model'] or platform.machine() or 'unknown'}"


def _visible_cpus() -> int:
    """CPUs this process may run on (affinity), which can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
