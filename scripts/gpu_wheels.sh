#!/usr/bin/env bash
# Download into the git-ignored folder .wheels/ every wheel the offline GPU image (CPython 3.12,
# x86_64, torch 2.11; see the device library's KINDS.md for what it already has) lacks for the
# GPU phases of scripts/gpu_bench.sh, so they travel with the working tree (`carry: [".wheels"]`).
# On the GPU machine scripts/gpu_bench.sh installs them with
#   pip install --no-index --no-deps --target /tmp/site .wheels/*.whl && export PYTHONPATH=/tmp/site
#
# - tomli-w: scaletrain writes RUN/config.toml with it (not in the image).
# - torchao 0.17.0 (--train.precision fp8): the release made for torch 2.11 (0.16.0 targets
#   torch 2.10). Float8 training is pure Python over torch._scaled_mm. TORCHAO_VERSION=... overrides.
# - torchtitan 0.2.2 and what it imports that the image lacks (--peer torchtitan), the same set
#   as ../shared/bench/torchtitan-anchor/prepare.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
TORCHAO_VERSION="${TORCHAO_VERSION:-0.17.0}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"

mkdir -p .wheels
# shellcheck disable=SC2046
"$PYTHON" -m pip download -q --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --dest .wheels \
    "torchao==${TORCHAO_VERSION}" tomli-w==1.2.0 \
    torchtitan==0.2.2 torchdata==0.11.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.0 \
    typing-extensions==4.16.0 tomli==2.5.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0
ls -l .wheels
du -sh .wheels
