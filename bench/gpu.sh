#!/usr/bin/env bash
# Every GPU check of pascal-dist in one run, for a lent H100/H200 or your own card; tables last, logs in $OUT.
#
#   bash bench/gpu.sh                      # with pascal-dist installed (GPU_SWEEP=1: every backend, ZeRO sweep)
#   bash bench/gpu.sh                      # on a machine without a package index: first, on one with pip,
#     DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl hjson pydantic pydantic-core annotated-types typing-inspection omegaconf antlr4-python3-runtime
#   and carry .whl/ along: it is installed into /tmp/site.
# What is still open on GPUs (the fused Pascal kernel's speed, the engine's overhead) is tracked as an issue;
# these scripts measure where the project stands: attention backends at T=256 and T=1024 (fused; banded with
# its Triton correction and with PyTorch ops), the full step plain vs ZeRO 1/2/3, unbiased and fused (tokens/s,
# TFLOP/s, MFU, peak memory), and the GPU-marked tests (bf16 numerics on CUDA, T up to 4096, head dim 128).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench-out}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # H100/H200 SXM bf16 dense
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
python3 -m pytest -q -m gpu tests/test_model.py tests/test_attention.py tests/test_band_kernels.py \
  tests/test_fused_attention.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -3
python3 bench/check_numerics.py --backends sdpa,reference,banded,fused > "$OUT/numerics.md" 2>"$OUT/numerics.log"
# Every --compile row compiles its model once (tens of seconds each). The default run times what the issue's
# targets need, fused against the unbiased ceiling and the engine against the plain loop; GPU_SWEEP=1 adds the
# other backends and the ZeRO option sweep (one option changed at a time: where do the engine's ms go?).
sweep=${GPU_SWEEP:-0}
if [ "$sweep" = 1 ]; then backends=none,sdpa,reference,banded,banded:torch,fused; else backends=none,banded,fused; fi
spec=(--n-layer 12 --n-embd 768 --n-head 12 --compile --backends "$backends")
python3 bench/bench_backends.py "${spec[@]}" --block-size 256 --batch 64 > "$OUT/backends-T256.md" 2>"$OUT/backends-T256.log"
python3 bench/bench_backends.py "${spec[@]}" --block-size 1024 --batch 16 > "$OUT/backends-T1024.md" 2>"$OUT/backends-T1024.log"
z2=configs/zero2.json
ds=(--ds "$z2")
if [ "$sweep" = 1 ]; then
  ds+=(--ds configs/zero1.json --ds configs/zero3.json --ds "$z2:zero_optimization.overlap_comm=false"
       --ds "$z2:zero_optimization.contiguous_gradients=false" --ds "$z2:zero_optimization.reduce_bucket_size=5e8")
fi
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 python3 bench/bench_step.py --spec \
  --compile --backend fused --peak-tflops "$PEAK_TFLOPS" --profile "$OUT/profile" "${ds[@]}" \
  > "$OUT/step.md" 2>"$OUT/step.log"
cat "$OUT/numerics.md" "$OUT/backends-T256.md" "$OUT/backends-T1024.md" "$OUT/step.md"
