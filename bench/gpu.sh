#!/usr/bin/env bash
# Every GPU check of pascal-dist in one run, for a lent H100/H200 or your own card; each table is printed as its
# stage ends (a cut-off run still shows what finished), full logs and tables in $OUT.
#
#   bash bench/gpu.sh     # every stage in order: step, dropout, backends, numerics, scope, budget, tests, attention
#   GPU_STAGES=step,dropout,backends,numerics bash bench/gpu.sh   # what the targets need (under 10 min)
#   GPU_STAGES=scope,budget,tests,attention bash bench/gpu.sh     # the rest, with what device time is left
#   GPU_SWEEP=1: every backend and the ZeRO option sweep; GPU_PROFILE=1: a torch.profiler table per step row
#   GPU_DRY_RUN=1: print each stage's name, time limit and command instead of running it (any machine)
#
# A lent machine has 15 minutes of device time in all, its start (a minute or two) included: run the targets'
# call first (timeout 600), then the rest with the time `status` says is left. Stages run in the order given, so a
# call cut short has measured the earlier ones.
#
# On a GPU machine without a package index: first, where pip works (same Python minor version as the GPU
# machine's, 3.12 by default), `bash bench/gpu.sh wheels` writes .whl/ (DeepSpeed and what it and OmegaConf need
# beyond a PyTorch image, pinned to the versions installed here); carry .whl/ along, it is installed into /tmp/site.
#
# What the stages measure, every model compiled block by block (train.compile_scope's default) unless said:
# step: the reference model's step at dropout 0 (the kernels' own speed), plain compiled PyTorch vs the ZeRO-2 engine
# (tokens/s, TFLOP/s, MFU, peak memory, the first step's compile seconds, ops and host waits per step, the reference
# recipe's projected time); dropout: the same at the reference recipe's dropout 0.1 (the 7.5 GiB peak memory target);
# backends: fused Pascal attention vs the unbiased SDPA ceiling at T=256 and T=1024 (full model step); numerics:
# each backend's bf16 output and gradients (d theta too) against float64; scope: the whole model compiled as one
# graph vs block by block, side by side; budget: the dropout-0.1 step at activation memory budget 0.9 (what
# keeping less costs in speed); tests: the GPU-marked tests (T up to 4096, head dim 128, dropout, compiled vs
# eager); attention: one attention layer per backend and the fused kernels' tile candidates.
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
STAGES=${GPU_STAGES:-step,dropout,backends,numerics,scope,budget,tests,attention}
for s in ${STAGES//,/ }; do
  case $s in step|dropout|backends|numerics|scope|budget|tests|attention) ;;
  *) echo "GPU_STAGES: unknown stage '$s' (expected step, dropout, backends, numerics, scope, budget, tests," \
          "attention)"; exit 2 ;;
  esac
done
dry=${GPU_DRY_RUN:-0}
[ "$dry" = 1 ] || mkdir -p "$OUT"
if [ "$dry" = 1 ]; then
  :
elif [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$dry" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"

# stage NAME SECONDS command...: table to $OUT/NAME.md (printed now), everything else to $OUT/NAME.log
stage() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ "$dry" = 1 ]; then echo "$name $limit $*"; return; fi
  timeout -k 10 "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
  rc=$?
  echo "== $name: rc $rc, $((SECONDS - start)) s$([ $rc = 124 ] && echo ", cut off at $limit s")"
  cat "$OUT/$name.md"
  [ $rc = 0 ] || tail -5 "$OUT/$name.log"
}

sweep=${GPU_SWEEP:-0}
z2=configs/zero2.json
spec_step=(python3 bench/bench_step.py --spec --compile --backend fused --peak-tflops "$PEAK_TFLOPS")
# Stages run in the order GPU_STAGES lists them: what the targets need first, so a run cut short by the device
# budget has measured those.
for s in ${STAGES//,/ }; do
  case $s in
  step)  # the ZeRO-2 engine against the plain compiled loop, reference model and batch, dropout 0
    ds=(--ds "$z2") limit=150
    if [ "$sweep" = 1 ]; then  # with DeepSpeed's own ZeRO-2 step (its overflow scan and per-tensor norm)
      ds+=(--ds-own "$z2" --ds configs/zero1.json --ds configs/zero3.json --ds "$z2:zero_optimization.overlap_comm=true"
           --ds "$z2:zero_optimization.contiguous_gradients=false" --ds "$z2:zero_optimization.reduce_bucket_size=5e8")
      limit=500
    fi
    profile=()
    [ "${GPU_PROFILE:-0}" = 1 ] && profile=(--profile "$OUT/profile")
    stage step $limit "${spec_step[@]}" "${profile[@]}" "${ds[@]}" ;;
  dropout)  # the reference recipe's dropout 0.1: the ZeRO-2 step's peak memory against the 7.5 GiB target
    stage step-dropout 110 "${spec_step[@]}" --dropout 0.1 --ds "$z2" ;;
  backends)  # fused Pascal attention against the unbiased ceiling, full model step; each row compiles once
    if [ "$sweep" = 1 ]; then backends=none,sdpa,reference,banded,banded:torch,fused; else backends=none,fused; fi
    spec=(--n-layer 12 --n-embd 768 --n-head 12 --compile --backends "$backends")
    stage backends-T256 105 python3 bench/bench_backends.py "${spec[@]}" --block-size 256 --batch 64
    stage backends-T1024 105 python3 bench/bench_backends.py "${spec[@]}" --block-size 1024 --batch 16 ;;
  numerics)
    stage numerics 75 python3 bench/check_numerics.py --backends sdpa,reference,banded,fused ;;
  tests)
    stage gpu-tests 220 python3 -m pytest -q -m gpu -p no:cacheprovider tests/unit/model/test_decoder.py \
      tests/unit/model/test_loss.py tests/unit/attention/test_band_kernels.py tests/unit/attention/test_fused.py \
      tests/unit/train/test_engine.py ;;
  attention)  # one attention layer, no torch.compile, every backend, and the fused kernels' tile candidates
    stage attention 200 python3 bench/bench_attention.py --tiles --backends none,fused,banded,banded:torch,sdpa,reference ;;
  scope)  # train.compile_scope: block by block against the whole model as one graph, plain loop, from an empty
         # compile cache (the earlier stages warmed the blocks'), blocks first: its first step is the cold compile
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) stage scope 170 "${spec_step[@]}" --compile-scope blocks,model --ds "$z2" ;;
  budget)  # train.activation_memory_budget 0.9 at dropout 0.1: the memory it saves against the speed it costs, to
          # compare with the dropout stage's table where the same card ran both (the device reply names it)
    stage step-dropout-budget 100 "${spec_step[@]}" --dropout 0.1 --memory-budget 0.9 --ds "$z2" ;;
  esac
done
