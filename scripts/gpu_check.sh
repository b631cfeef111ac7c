#!/usr/bin/env bash
# On a lent GPU machine (CUDA torch, nvcc; no vLLM, no internet), from the repository root, in one call:
# build the CUDA kernels (JIT), test them against the reference, time them. Logs and JSON go to $OUT (the device
# tool brings that folder back), else to benchmarks/results/.
#   run: bash scripts/gpu_check.sh
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=$(command -v python3)
{ nvidia-smi; "$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; nvcc --version | tail -1; } > "$out/gpu_device.txt" 2>&1
"$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_reference.py 2>&1 | tee "$out/kernel_tests_cuda.log" | tail -30
tests=${PIPESTATUS[0]}
"$py" -m benchmarks.bench_moe_kernels --out "$out/moe_kernels_cuda.json" 2>&1 | tee "$out/moe_kernels_cuda.log" | tail -60
exit "$tests"
