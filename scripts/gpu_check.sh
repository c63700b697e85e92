#!/usr/bin/env bash
# The GPU check, one prepared run (see ../shared/device/README.md). From the project root, with the
# wheels of ../shared/device/fetch-wheels.sh in .whl/:
#     bash scripts/gpu_check.sh            # writes its log to $OUT (or ./gpu_check_out)
# 1. the CPU test suite of extraction with flash-linear-attention installed (the kernels must be
#    chosen by device: fla's Triton kernels crash on CPU tensors);
# 2. scripts/gpu_check.py: fla vs torch kernel agreement, extraction on CUDA against
#    run_with_cache, and the speed figures (the bridge-vs-HF forward test runs on CUDA in between).
set -uo pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_check.txt"
echo "== CPU tests with fla installed ==" | tee -a "$out/gpu_check.txt"
CUDA_VISIBLE_DEVICES= timeout 120 python3 -m pytest -q -x -p no:cacheprovider -k "not free_space and not overwrite" \
    tests/test_models.py tests/test_extract.py 2>&1 | tail -15 | tee -a "$out/gpu_check.txt"
echo "== hooked bridge vs HF forward on CUDA (active kernels) ==" | tee -a "$out/gpu_check.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -k hooked_bridge tests/test_models.py 2>&1 \
    | tail -5 | tee -a "$out/gpu_check.txt"
echo "== GPU check ==" | tee -a "$out/gpu_check.txt"
timeout 220 python3 scripts/gpu_check.py "$@" 2>&1 | grep -v "Warning\|warn(" | tee -a "$out/gpu_check.txt"
