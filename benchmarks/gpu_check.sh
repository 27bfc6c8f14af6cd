#!/usr/bin/env bash
# The offline GPU check: at most 8 minutes on one GPU (each part has its own time limit).
# Run from the repository root on a CUDA machine with PyTorch, Lightning and transformers (the
# GPU image DEVELOPERS.md describes) and the wheels `nox -s wheelhouse` wrote into .whl/ beside
# it; nothing is fetched:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu-check
#
# 1. installs the wheels without an index into a folder on PYTHONPATH (the image's own
#    packages stay as they are);
# 2. the GPU-marked tests: each strategy on one GPU (auto, DeepSpeed ZeRO-2 and 3, FSDP2) with
#    checkpoint, resume and export, a 16-mixed SDXL run with its float32 VAE, Inductor across
#    bucket shapes, 8-bit AdamW, the launch's memory plan against the device, the EMA on CUDA;
# 3. benchmarks/gpu_throughput.py at full size, setting by setting, inside its budget.
#
# Writes summary.txt (each part's exit code and seconds, then the throughput table), env.txt,
# tests.log, throughput.log and throughput.json into OUT_DIR. Exits non-zero if a part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
status=0

part() {  # part NAME LIMIT_S LOG COMMAND...: run one part, log it, note its code and time
    local name=$1 limit=$2 log=$3 start code
    shift 3
    start=$(date +%s)
    # -k: Lightning traps SIGTERM to checkpoint; a hung CUDA call still ends 15 s later.
    timeout -k 15 "$limit" "$@" > "$log" 2>&1
    code=$?
    echo "$name: exit $code in $(( $(date +%s) - start )) s" | tee -a "$summary"
    [ "$code" -eq 0 ] || status=1
}

site=/tmp/cnet-site
part install 60 "$out/env.txt" python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$site" .whl/*.whl
# The checkout's own sources come first: .whl/ may hold cnet wheels older than the tree.
src=packages/cnet-data/src:packages/cnet-models/src:packages/cnet-train/src
export PYTHONPATH="$src:$site${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, lightning, transformers, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
    python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
} >> "$out/env.txt" 2>&1

# A test that hangs is named in the log (pytest-timeout is in the GPU image; skipped if not).
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=90)
# shellcheck disable=SC2086  # empty or one word
part gpu-tests 200 "$out/tests.log" python3 -m pytest -v -m gpu -p no:cacheprovider \
    $per_test -o addopts="-ra --strict-markers --import-mode=importlib" tests
part throughput 220 "$out/throughput.log" python3 benchmarks/gpu_throughput.py \
    --settings sdpa,channels-last,latent-cache,bf16-frozen,unet-ckpt,eager,deepspeed,fsdp,compile \
    --budget-s 150 --json "$out/throughput.json"

echo >> "$summary"
grep -E "^(family|sd15|sd21|sdxl|skipped) " "$out/throughput.log" >> "$summary" || true
tail -3 "$out/tests.log" >> "$summary"
cat "$summary"
exit "$status"
