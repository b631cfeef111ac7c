#!/usr/bin/env bash
# The plugin against vLLM 0.33's interfaces (the CUDA build: the CPU build is still 0.32), in a virtual environment of
# its own ($BITSMOE_VENV_033, default .venv-vllm033; about 8.5 GB): tests/vllm_layer_check.py builds, loads and runs one
# BitsMoE layer through vLLM's MoE layer on CPU tensors, as far as a CUDA build goes without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${BITSMOE_VENV_033:-.venv-vllm033}")
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip "setuptools==78.1.1" wheel
# vllm 0.33.0 pins torch 2.14.0; 2.14.1 (the same ABI, and on these machines' disk) serves, so vLLM goes in without its
# pins, then what it needs but the torch family, which the check does not use
pip install -q "torch==2.14.1"
pip install -q --no-deps "vllm==0.33.0"
"$venv/bin/python" - > "$venv/vllm-requirements.txt" <<'PY'
import importlib.metadata, re
for r in importlib.metadata.requires("vllm"):
    if "extra ==" not in r and not re.match(r"(torch|torchaudio|torchvision|torchcodec|flashinfer|xformers)\b", r):
        print(r)
PY
pip install -q -r "$venv/vllm-requirements.txt"
# built from a copy of the tracked files, so that no object or library built against the other torch is reused
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -c | tar -x -C "$src"
(cd "$src" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} pip install -q --no-build-isolation --no-deps .)
cd "$src"  # the installed bitsmoe_vllm, built against this torch, is the one imported
"$venv/bin/python" tests/vllm_layer_check.py 2>&1 | grep -vE "^(WARNING|INFO|W[0-9]{4} |\[W)" | tail -20
exit "${PIPESTATUS[0]}"
