#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (CUDA torch and nvcc, no vLLM, no internet), from the repository
# root: install (compiling the CPU and CUDA kernels as setup.py does), run the CUDA tests against the reference
# (kernels, CUDA graphs, opcheck, the backend oracle, the quantizer's --device cuda against its CPU run), quantize the
# trained MoE on CUDA and time the kernels. Seven files, named after the GPU, go to $OUT (the device tool brings
# them back; commit them to benchmarks/results/), else to benchmarks/results/.
#
#   bash scripts/gpu_check.sh prepare    # here, once: what the machine lacks, into .gpu/ (ignored; carry it)
#   bash scripts/gpu_check.sh            # there: device run(command="bash scripts/gpu_check.sh", carry=[".gpu"])
set -uo pipefail
py=${PY:-python3}

if [ "${1:-}" = prepare ]; then # highspy for the quantizer's ILP; the trained MoE's calibration split
  grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
  mkdir -p .gpu
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .gpu "highspy==$("$py" -c 'import highspy, importlib.metadata as m; print(m.version("highspy"))')"
  "$py" -c "from benchmarks.corpus import write_splits; import shutil; shutil.copy(write_splits('benchmarks/work/text-mixed', True)['calib'], '.gpu/calib.jsonl')"
  exit
fi

out=${OUT:-benchmarks/results}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z_' | sed 's/^nvidia_//')
p="$out/gpu_${gpu:-none}"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
stage() { echo "=== $(date -u +%T) $*"; }

{
  nvidia-smi
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  gcc --version | head -1
  nproc
} >"${p}_device.txt" 2>&1

stage "install (CPU and CUDA kernels)"
if ! "$py" -c "import highspy" 2>/dev/null; then "$py" -m pip install -q --no-index --no-deps .gpu/*.whl 2>&1 | tail -3; fi
SECONDS=0
timeout 300 "$py" -m pip install -v --no-index --no-deps --no-build-isolation -e . >"${p}_build.log" 2>&1
echo "pip install rc $? in ${SECONDS}s" | tee -a "${p}_build.log"
"$py" -c "import bitsmoe_vllm.offline; from bitsmoe_vllm import cuda, ops; print('installed CUDA kernels', \
  cuda.load_kernels(), 'CPU kernel', ops.CPU_KERNEL)" 2>&1 | tee -a "${p}_build.log"

stage "tests on CUDA"
timeout 300 "$py" -m pytest -q -p no:cacheprovider -rfE --durations=5 tests/test_kernels.py tests/test_reference.py \
  tests/test_backend.py tests/test_packing.py "tests/test_quantize.py::test_device_cuda_quantizes_as_the_cpu_does" \
  >"${p}_tests.log" 2>&1
tests=$?
tail -15 "${p}_tests.log"

stage "quantize the trained MoE on CUDA"
if [ -f .gpu/calib.jsonl ]; then
  rm -rf /tmp/trained-moe-cuda
  timeout 150 "$py" -c "from bitsmoe_vllm.offline.cli import main; raise SystemExit(main())" \
    --model benchmarks/models/trained-moe --out /tmp/trained-moe-cuda --bits 2.5 --calib .gpu/calib.jsonl \
    --calib-tokens 16384 --calib-seq-len 512 --device cuda 2>&1 | tr '\r' '\n' | grep -v -e '%|' -e '^$' >"${p}_quantize_trained_moe.log"
  echo "rc ${PIPESTATUS[0]}" >>"${p}_quantize_trained_moe.log"
  tail -2 "${p}_quantize_trained_moe.log"
  cp /tmp/trained-moe-cuda/quantization_report.json "${p}_quantize_trained_moe.json" 2>/dev/null
fi

stage "kernel benchmark"
timeout 240 "$py" -m benchmarks.bench_moe_kernels --tokens 1 4 16 256 2048 --out "${p}_moe_kernels.json" 2>&1 |
  tee "${p}_moe_kernels.log"
echo "rc ${PIPESTATUS[0]}" >>"${p}_moe_kernels.log"
stage "done (tests rc $tests)"
exit "$tests"
