#!/usr/bin/env bash
# Every GPU check of pascal-dist in one run, for a lent H100/H200 or your own card; each table is printed as its
# stage ends (a cut-off run still shows what finished), full logs and tables in $OUT.
#
#   bash bench/gpu.sh          # all stages: attention op + tile sweep, gpu tests + numerics, training step, backends
#   GPU_STAGES=attention,tests,step bash bench/gpu.sh; GPU_STAGES=backends bash bench/gpu.sh  # two calls, < 10 min each
#   GPU_SWEEP=1: every backend and the ZeRO option sweep; GPU_PROFILE=1: a torch.profiler table per step row
#
# On a GPU machine without a package index: first, where pip works (same Python minor version as the GPU
# machine's, 3.12 by default), `bash bench/gpu.sh wheels` writes .whl/ (DeepSpeed and what it and OmegaConf need
# beyond a PyTorch image, pinned to the versions installed here); carry .whl/ along, it is installed into /tmp/site.
#
# What the stages measure: one attention layer, forward + backward, every backend vs unbiased SDPA flash, and the
# fused kernels' tile candidates; fused Pascal attention vs the unbiased SDPA ceiling at T=256 and T=1024 (full
# model step); the full step plain compiled PyTorch vs the ZeRO engine (tokens/s, TFLOP/s, MFU, peak memory, ops and
# host waits per step); bf16 numerics on CUDA against float64 (GPU-marked tests, T up to 4096, head dim 128).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

if [ "${1:-}" = wheels ]; then
  py=${GPU_PYTHON_VERSION:-3.12}
  pins=$(python3 - <<'EOF'
from importlib.metadata import version
names = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
         "omegaconf", "psutil", "einops", "msgpack", "tqdm", "py-cpuinfo"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
  ) || exit 2
  ds=$(python3 -c "from importlib.metadata import version; print(version('deepspeed'))") || exit 2
  mkdir -p .whl && rm -f .whl/*.whl
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$ds" || exit 2
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins || exit 2
  ls .whl
  exit 0
fi

OUT=${OUT:-bench-out}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # H100/H200 SXM bf16 dense
STAGES=${GPU_STAGES:-attention,tests,step,backends}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"

# stage NAME SECONDS command...: table to $OUT/NAME.md (printed now), everything else to $OUT/NAME.log
stage() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout -k 10 "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
  rc=$?
  echo "== $name: rc $rc, $((SECONDS - start)) s$([ $rc = 124 ] && echo ", cut off at $limit s")"
  cat "$OUT/$name.md"
  [ $rc = 0 ] || tail -5 "$OUT/$name.log"
}

sweep=${GPU_SWEEP:-0}
if [[ $STAGES == *attention* ]]; then  # no torch.compile: a minute or two, and the kernel-level picture first
  stage attention 240 python3 bench/bench_attention.py --tiles --backends none,fused,banded,banded:torch,sdpa,reference
fi
if [[ $STAGES == *tests* ]]; then
  stage gpu-tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_model.py tests/test_band_kernels.py \
    tests/test_fused_attention.py
  stage numerics 120 python3 bench/check_numerics.py --backends sdpa,reference,banded,fused
fi
if [[ $STAGES == *step* ]]; then
  # The engine against the plain loop, before the backend sweep: it is the other half of what the issue asks.
  z2=configs/zero2.json
  ds=(--ds "$z2" --ds-own "$z2")  # the second: what DeepSpeed's per-tensor overflow scan and norm cost
  if [ "$sweep" = 1 ]; then
    ds+=(--ds configs/zero1.json --ds configs/zero3.json --ds "$z2:zero_optimization.overlap_comm=true"
         --ds "$z2:zero_optimization.contiguous_gradients=false" --ds "$z2:zero_optimization.reduce_bucket_size=5e8")
  fi
  profile=()
  [ "${GPU_PROFILE:-0}" = 1 ] && profile=(--profile "$OUT/profile")
  stage step 260 python3 bench/bench_step.py --spec --compile --backend fused --peak-tflops "$PEAK_TFLOPS" \
    "${profile[@]}" "${ds[@]}"
fi
if [[ $STAGES == *backends* ]]; then
  # Each --compile row compiles its model once (tens of seconds): the default rows are what the targets need.
  if [ "$sweep" = 1 ]; then backends=none,sdpa,reference,banded,banded:torch,fused; else backends=none,banded,fused; fi
  spec=(--n-layer 12 --n-embd 768 --n-head 12 --compile --backends "$backends")
  stage backends-T256 280 python3 bench/bench_backends.py "${spec[@]}" --block-size 256 --batch 64
  stage backends-T1024 280 python3 bench/bench_backends.py "${spec[@]}" --block-size 1024 --batch 16
fi
