#!/usr/bin/env bash
# Installs the fedpeft-edge device agent (only what a device needs to train and report) into a venv.
# Platforms: Jetson (JetPack 5/6: torch from NVIDIA's wheel for the board's L4T release, never PyPI's CUDA
# torch), x86 laptops (CPU or CUDA), Apple silicon (MPS) and Raspberry Pi (aarch64 CPU). docs/devices.md.
#
#   scripts/install_agent.sh [--venv DIR] [--python PY] [--platform auto|jetson|cpu|cuda|mps|rpi]
#                            [--torch-wheel FILE|URL] [--torchvision-wheel FILE|URL]
#                            [--torch-index URL|default] [--torch-version V] [--extras onnx,nvidia] [--source DIR]
#
# --torch-wheel/--torchvision-wheel: wheels to install first (required on a Jetson: NVIDIA's wheels for its
#   L4T release, e.g. from the JetPack's PyTorch page or a file you copied to the board).
# --torch-index: where pip looks for torch when no wheel is given; "default" = pip's configured index.
#   Default per platform: cpu and rpi = PyTorch's CPU-only index; cuda, mps = pip's configured index.
#   PyPI's Linux x86 wheels are CUDA builds, and so are its Linux aarch64 wheels from torch 2.11 on: they pull
#   about 3 GB of NVIDIA libraries (CUDA 13, for Grace servers) onto a Pi. torch 2.10.0 is PyPI's last CPU-only
#   aarch64 torch: a Pi limited to PyPI uses `--torch-index default --torch-version 2.10.0`.
# --torch-version: install torch==V (and the torchvision pip finds for it) instead of the newest.
# Whatever torch is installed first is pinned while the agent's other packages install, so pip can never
# swap it for another build.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HOME/.local/share/fedpeft-agent/venv}
PY=${PYTHON:-python3}
PLATFORM=auto
TORCH_WHEEL=""
TORCHVISION_WHEEL=""
TORCH_INDEX=""
TORCH_VERSION=""
EXTRAS=""
FEDML_VERSION=0.9.6
CPU_INDEX=https://download.pytorch.org/whl/cpu
NV_TEGRA_RELEASE=${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}  # L4T's release file (tests point it elsewhere)

die() { echo "install_agent: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --platform) PLATFORM=$2; shift 2 ;;
        --torch-wheel) TORCH_WHEEL=$2; shift 2 ;;
        --torchvision-wheel) TORCHVISION_WHEEL=$2; shift 2 ;;
        --torch-index) TORCH_INDEX=$2; shift 2 ;;
        --torch-version) TORCH_VERSION=$2; shift 2 ;;
        --extras) EXTRAS=$2; shift 2 ;;
        --source) SRC=$(cd "$2" && pwd); shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) die "unknown option $1; see --help" ;;
    esac
done

l4t_release() {
    # "R36" from /etc/nv_tegra_release ("# R36 (release), REVISION: 3.0 ..."), empty elsewhere.
    [ -r "$NV_TEGRA_RELEASE" ] && sed -n 's/^# \(R[0-9]*\) .*/\1/p' "$NV_TEGRA_RELEASE" | head -n1 || true
}

detect_platform() {
    if [ -n "$(l4t_release)" ]; then echo jetson; return; fi
    if [ "$(uname -s)" = "Darwin" ]; then echo mps; return; fi
    if [ "$(uname -m)" = "aarch64" ] && grep -qs "Raspberry Pi" /proc/device-tree/model; then echo rpi; return; fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; return; fi
    echo cpu
}

[ "$PLATFORM" = auto ] && PLATFORM=$(detect_platform)
case "$PLATFORM" in jetson|cpu|cuda|mps|rpi) ;; *) die "--platform $PLATFORM: use jetson, cpu, cuda, mps or rpi" ;; esac

command -v "$PY" >/dev/null || die "no $PY; pass --python /path/to/python3.10+"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    if [ "$PLATFORM" = jetson ] && [ "$(l4t_release)" = R35 ]; then
        die "JetPack 5 (L4T R35) ships Python $PYVER and NVIDIA's JetPack 5 torch wheels are cp38; the agent needs" \
            "Python >= 3.10. Install Python 3.10 and a torch wheel built for it and L4T R35, then pass" \
            "--python python3.10 --torch-wheel FILE (docs/devices.md), or move the board to JetPack 6."
    fi
    die "Python $PYVER is too old: the agent needs >= 3.10 (what JetPack 6 ships); pass --python"
fi

if [ "$PLATFORM" = jetson ]; then
    [ -n "$TORCH_WHEEL" ] || die "on a Jetson ($(l4t_release)) pass --torch-wheel with NVIDIA's torch wheel for this" \
        "L4T release and Python $PYVER (file or URL, docs/devices.md); PyPI's CUDA torch does not run on Tegra"
    [ -n "$TORCHVISION_WHEEL" ] || die "on a Jetson pass --torchvision-wheel too: timm needs torchvision, and" \
        "PyPI's torchvision is built against PyPI's torch, not NVIDIA's"
fi
[ -z "$TORCHVISION_WHEEL" ] || [ -n "$TORCH_WHEEL" ] || die "--torchvision-wheel needs --torch-wheel"
[ -z "$TORCH_VERSION" ] || [ -z "$TORCH_WHEEL" ] || die "--torch-version and --torch-wheel exclude each other"

echo "install_agent: platform $PLATFORM $(l4t_release), Python $PYVER, venv $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip setuptools wheel

if [ -n "$TORCH_WHEEL" ]; then
    "${PIP[@]}" install -q "$TORCH_WHEEL" ${TORCHVISION_WHEEL:+"$TORCHVISION_WHEEL"}
else
    index=${TORCH_INDEX:-$(case "$PLATFORM" in cpu|rpi) echo "$CPU_INDEX" ;; *) echo default ;; esac)}
    torch="torch${TORCH_VERSION:+==$TORCH_VERSION}"
    if [ "$index" = default ]; then
        "${PIP[@]}" install -q "$torch" torchvision
    else
        "${PIP[@]}" install -q --index-url "$index" "$torch" torchvision
    fi
fi

# Pin the torch (and torchvision) just installed while the rest resolves.
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
"$VENV/bin/python" - "$pins" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

with open(sys.argv[1], "w") as out:
    for name in ("torch", "torchvision"):
        try:
            out.write(f"{name}=={version(name)}\n")
        except PackageNotFoundError:
            pass
EOF
spec="$SRC"
[ -n "$EXTRAS" ] && spec="$SRC[$EXTRAS]"
"${PIP[@]}" install -q -c "$pins" "$spec"
# FedML's pins cannot resolve beside a modern stack: only its messaging layer is imported
# (fedpeft_edge/transport/fedml.py), so it goes in without its dependencies.
"${PIP[@]}" install -q --no-deps "fedml==$FEDML_VERSION"

"$VENV/bin/python" -c "import torch, fedpeft_edge.client.manager as _; print('install_agent: torch', torch.__version__,
'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')"
echo "install_agent: done; check the device with: $VENV/bin/fedpeft-agent doctor --config RUN.yaml --device-id ID"
