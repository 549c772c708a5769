#!/usr/bin/env bash
# An emulated arm64 (aarch64) device on an x86 Linux host: a Debian arm64 root built once with debootstrap, run
# through qemu-user (binfmt_misc), with the agent installed in it by scripts/install_agent.sh --platform rpi from
# PyPI's aarch64 wheels. It shares the host's network (a broker and server on 127.0.0.1 are reachable).
# Needs root, qemu-user-static and debootstrap. Figures and commands: docs/devices.md, docs/results/arm64.md.
#
#   scripts/arm64_device.sh [--cache DIR] [--suite S] [--mirror URL] [--bind DIR]... COMMAND [ARGS...]
#
#   check                  exit 0 when this host can run an emulated arm64 device, else print why and exit 1
#   build                  build the root (once) and install the agent in it (again when the install's inputs change)
#   doctor ARGS...         `fedpeft-agent doctor ARGS` inside the device
#   run-agent ARGS...      `fedpeft-agent ARGS` inside the device (SIGTERM reaches the agent)
#   exec CMD...            any command inside the device (cwd /, the agent venv's bin first on PATH)
#   root                   print where the root is (the agent venv is /opt/fedpeft-agent/venv inside it)
#   clean                  remove the cache (the root and its venv)
#
# --cache DIR  where the root lives (default $FEDPEFT_ARM64_CACHE, else ~/.cache/fedpeft-edge/arm64)
# --suite S    Debian suite of the root (default: the host's VERSION_CODENAME, so its python3 is the host's)
# --bind DIR   also visible inside the device at the same path, writable (config, data, run and log dirs)
# --torch-version V  torch for the device, from pip's configured index (default $FEDPEFT_ARM64_TORCH, else 2.10.0:
#              PyPI's last CPU-only aarch64 torch; from 2.11 on PyPI's aarch64 torch is a CUDA build that pulls
#              NVIDIA's libraries. A real Pi takes torch from PyTorch's CPU index: install_agent.sh --platform rpi)
# This checkout is visible inside the device at its own path, read-only, and is on the agent's PYTHONPATH: the
# device runs this checkout's code on the venv's packages (the venv's own copy is what a device would install).
#
# Every mount (proc, sys, dev, the binds, binfmt_misc when the host has none mounted) is made in a private mount
# namespace that ends with the command, so nothing stays mounted after it, however it ends (even SIGKILL). Where
# the host has binfmt_misc mounted and no qemu-aarch64 entry, the entry registered stays, as update-binfmts' would:
# remove it with `echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64`.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${FEDPEFT_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedpeft-edge/arm64}
SUITE=""
MIRROR=${FEDPEFT_ARM64_MIRROR:-http://deb.debian.org/debian}
BINDS=()
TORCH_VERSION=${FEDPEFT_ARM64_TORCH:-2.10.0}
# What a Raspberry Pi gets before the agent (docs/devices.md): python3 + venv, and OpenBLAS.
PACKAGES=python3,python3-venv,ca-certificates,libopenblas0
VENV_IN=/opt/fedpeft-agent/venv
SRC_IN=/opt/fedpeft-agent/src
BINFMT=/proc/sys/fs/binfmt_misc
QEMU_CONF=/usr/lib/binfmt.d/qemu-aarch64.conf

die() { echo "arm64_device: $*" >&2; exit 2; }
say() { echo "arm64_device: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE=$2; shift 2 ;;
        --suite) SUITE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --bind) BINDS+=("$(cd "$2" && pwd)"); shift 2 ;;
        --torch-version) TORCH_VERSION=$2; shift 2 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        -*) die "unknown option $1; see --help" ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || die "no command; see --help"
CMD=$1; shift
[ -n "$SUITE" ] || SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$SUITE" ] || die "cannot tell the host's Debian suite from /etc/os-release; pass --suite (e.g. bookworm)"
ROOT=$CACHE/rootfs-$SUITE

# Inside a private mount namespace: mount binfmt_misc where the host has none mounted, register qemu-aarch64 from
# qemu-user-static's binfmt.d file where it is missing, and check the entry can serve a chroot (the F flag: qemu
# is opened at registration, so the root needs no copy of it). $1 = binfmt_misc's path, $2 = the binfmt.d file.
# Where the host had binfmt_misc mounted, the entry stays (like update-binfmts'); where this mounted it, the
# mount, and on a kernel whose entries live in the mount the entry too, end with the namespace.
BINFMT_SETUP='
    b=$1 conf=$2
    [ -e "$b/register" ] || mount -t binfmt_misc binfmt_misc "$b" || { echo "cannot mount binfmt_misc at $b" >&2; exit 1; }
    if [ ! -e "$b/qemu-aarch64" ]; then
        [ -r "$conf" ] || { echo "no $conf (apt-get install qemu-user-static)" >&2; exit 1; }
        cat "$conf" > "$b/register" 2>/dev/null || [ -e "$b/qemu-aarch64" ] \
            || { echo "writing $b/register was refused" >&2; exit 1; }
    fi
    grep -q "^enabled" "$b/qemu-aarch64" || { echo "$b/qemu-aarch64 is disabled: echo 1 > $b/qemu-aarch64" >&2; exit 1; }
    grep -q "^flags:.*F" "$b/qemu-aarch64" || { echo "$b/qemu-aarch64 lacks the F flag a chroot needs" >&2; exit 1; }
'

# Why emulation cannot run here (empty when it can).
why_not() {
    [ "$(uname -m)" = x86_64 ] || { echo "the host is $(uname -m), not x86_64"; return; }
    [ "$(id -u)" = 0 ] || { echo "not root (chroot, mounts and binfmt_misc need root)"; return; }
    command -v qemu-aarch64-static >/dev/null || { echo "no qemu-aarch64-static: apt-get install qemu-user-static"; return; }
    command -v debootstrap >/dev/null || [ -f "$ROOT/.root-ok" ] || { echo "no debootstrap: apt-get install debootstrap"; return; }
    command -v unshare >/dev/null || { echo "no unshare (util-linux)"; return; }
    local err
    if ! err=$(unshare --mount --propagation private sh -ec "$BINFMT_SETUP" sh "$BINFMT" "$QEMU_CONF" 2>&1); then
        echo "binfmt_misc: $err"; return
    fi
    [ -f "$ROOT/.root-ok" ] || return 0
    err=$(in_root /bin/uname -m 2>&1) || { echo "the arm64 root does not run: $err"; return; }
    [ "$err" = aarch64 ] || echo "the arm64 root says uname -m = $err"
}

# Run a command inside the root with proc, sys, dev, this checkout (ro) and the binds mounted in a private mount
# namespace; `exec` all the way down so the caller's signals reach the emulated process.
in_root() {
    [ -f "$ROOT/.root-ok" ] || die "no arm64 root at $ROOT: run '$0 build' first"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    exec_env=(env -i PATH="$VENV_IN/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root
              LANG=C.UTF-8 PYTHONPATH="$REPO" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
              PYTHONDONTWRITEBYTECODE=1)
    for v in $(compgen -e | grep -E '^(PIP_(INDEX_URL|EXTRA_INDEX_URL|TRUSTED_HOST|DEFAULT_TIMEOUT|RETRIES|DISABLE_PIP_VERSION_CHECK|CERT)|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY|FEDPEFT_[A-Z_]+)$' || true); do
        exec_env+=("$v=${!v}")
    done
    local binds="" d
    for d in "$REPO" "${BINDS[@]}"; do binds+="$d"$'\n'; done
    local run=(unshare --mount --propagation private bash -ec '
        root=$1 repo=$2 binds=$3 setup=$4; shift 4
        sh -ec "$setup" sh '"$BINFMT"' '"$QEMU_CONF"'
        mount -t proc proc "$root/proc"
        mount --rbind /sys "$root/sys"
        mount --rbind /dev "$root/dev"
        while IFS= read -r d; do
            [ -n "$d" ] || continue
            mkdir -p "$root$d"
            mount --bind "$d" "$root$d"
            [ "$d" != "$repo" ] || mount -o remount,bind,ro "$root$d"
        done <<< "$binds"
        exec chroot "$root" "$@"' in_root "$ROOT" "$REPO" "$binds" "$BINFMT_SETUP" "${exec_env[@]}" "$@")
    # IN_ROOT_EXEC=1: this shell becomes the device's process (the agent's pid is the caller's child's pid).
    if [ "${IN_ROOT_EXEC:-0}" = 1 ]; then exec "${run[@]}"; else ( exec "${run[@]}" ); fi
}

build_root() {
    if [ -f "$ROOT/.root-ok" ] && [ "$(cat "$ROOT/.root-ok")" = "$SUITE $PACKAGES" ]; then return; fi
    local tmp=$ROOT.tmp
    rm -rf "$tmp" "$ROOT"
    mkdir -p "$CACHE"
    say "debootstrap --arch=arm64 --variant=minbase $SUITE (python3 and the Pi's packages) into $ROOT"
    local t0=$SECONDS
    # Its second stage runs arm64 binaries: in a namespace with the emulator registered (the mounts it makes end there).
    unshare --mount --propagation private bash -ec 'sh -ec "$1" sh "$2" "$3"; shift 3; exec debootstrap "$@"' \
        debootstrap "$BINFMT_SETUP" "$BINFMT" "$QEMU_CONF" \
        --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    rm -rf "$tmp/var/cache/apt/archives/"*.deb
    echo "$SUITE $PACKAGES" > "$tmp/.root-ok"
    mv "$tmp" "$ROOT"
    say "root built in $((SECONDS - t0)) s"
}

# pip inside the device is configured as on this host: its config files and CA bundle are copied in.
copy_pip_config() {
    local f
    for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt ${PIP_CERT:-} ${PIP_CONSTRAINT:-}; do
        [ -f "$f" ] || continue
        mkdir -p "$ROOT$(dirname "$f")"
        cp -L "$f" "$ROOT$f"
    done
}

install_stamp() {
    { echo "$TORCH_VERSION"; cat "$REPO/pyproject.toml" "$REPO/scripts/install_agent.sh" /etc/xdg/pip/constraints.txt \
        2>/dev/null; } | sha256sum | cut -c1-16
}

install_agent() {
    local want; want=$(install_stamp)
    if [ -f "$ROOT$VENV_IN/.stamp" ] && [ "$(cat "$ROOT$VENV_IN/.stamp")" = "$want" ]; then
        say "agent venv up to date ($VENV_IN in $ROOT)"; return
    fi
    copy_pip_config
    rm -rf "$ROOT$SRC_IN" "$ROOT$VENV_IN"
    mkdir -p "$ROOT$SRC_IN"
    # A copy of the checkout's tracked files: pip builds a source tree in place, the checkout stays untouched.
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
        | tar -xf - -C "$ROOT$SRC_IN"
    say "installing the agent under emulation (scripts/install_agent.sh --platform rpi)"
    local t0=$SECONDS
    in_root /bin/bash "$SRC_IN/scripts/install_agent.sh" --platform rpi --venv "$VENV_IN" --python /usr/bin/python3 \
        --source "$SRC_IN" --torch-index default --torch-version "$TORCH_VERSION"
    in_root "$VENV_IN/bin/python" -m pip list --format=freeze > "$ROOT$VENV_IN/.wheels"
    echo "$want" > "$ROOT$VENV_IN/.stamp"
    say "agent installed in $((SECONDS - t0)) s"
}

case "$CMD" in
    check)
        reason=$(why_not)
        [ -z "$reason" ] || { echo "$reason"; exit 1; }
        echo "ok: emulated arm64 device ($ROOT$([ -f "$ROOT/.root-ok" ] || echo ', not built yet'))" ;;
    build)
        reason=$(why_not); [ -z "$reason" ] || die "$reason"
        build_root
        reason=$(why_not); [ -z "$reason" ] || die "$reason"
        install_agent ;;
    doctor) IN_ROOT_EXEC=1 in_root "$VENV_IN/bin/fedpeft-agent" doctor "$@" ;;
    run-agent) IN_ROOT_EXEC=1 in_root "$VENV_IN/bin/fedpeft-agent" "$@" ;;
    exec) IN_ROOT_EXEC=1 in_root "$@" ;;
    root) echo "$ROOT" ;;
    clean) rm -rf "$ROOT" "$ROOT.tmp" ;;
    *) die "unknown command $CMD; see --help" ;;
esac
