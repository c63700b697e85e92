#!/usr/bin/env bash
# The GPU check, one prepared run (see ../shared/device/README.md). From the project root, with the
# wheels of ../shared/device/fetch-wheels.sh in .whl/:
#     bash scripts/gpu_check.sh [gpu_check.py options]   # its log goes to $OUT (or ./gpu_check_out)
# 1. the CPU tests of models and extraction with flash-linear-attention importable (the kernels must
#    be chosen by device: fla's Triton kernels crash on CPU tensors);
# 2. the bridge-vs-HF forward test on CUDA with the active kernels;
# 3. scripts/gpu_check.py: fla vs torch kernel agreement, extraction on CUDA against run_with_cache,
#    the speed figures and a real out-of-memory halving.
set -uo pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
log="$out/gpu_check.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$log"
echo "== CPU tests with fla installed ==" | tee -a "$log"
CUDA_VISIBLE_DEVICES= timeout 150 python3 -m pytest -o addopts= -q -x -p no:cacheprovider \
    -k "not free_space and not overwrite and not writable" tests/model/test_models.py tests/run/test_extract.py 2>&1 \
    | tail -15 | tee -a "$log"
echo "== hooked bridge vs HF forward on CUDA (active kernels) ==" | tee -a "$log"
timeout 120 python3 -m pytest -o addopts= -q -p no:cacheprovider -k "hooked_bridge or kernels" tests/model/test_models.py 2>&1 \
    | grep -E "passed|failed|Error|assert" | tee -a "$log"
echo "== gpu_check.py ==" | tee -a "$log"
timeout 480 python3 scripts/gpu_check.py "$@" 2>&1 | grep -v "Warning\|warn(" | tee -a "$log"
