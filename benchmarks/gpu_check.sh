#!/usr/bin/env bash
# The GPU check: one command that proves the CUDA path and measures it, within ~8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps, in order, each under `timeout` and within a total budget (GPU_CHECK_BUDGET_S, default 470 s), so a step that
# fails or hangs is recorded and the next one still runs:
#   wheels      install the carried wheels (.gpu-wheels/, from `make gpu-wheels`) into a temporary --target, no network
#   env         versions, GPU, nvidia-smi; probe the optional xFormers wheel (used below only if it runs)
#   cuda_tests  pytest -m cuda: attention kernels vs math, bf16 vs fp32 step, FSDP2 vs DDP, SIGKILL + resume, eval-knn
#   step_vits14 / step_vitb14 / step_vitl14   benchmarks/train_step.py, bf16, 2 x 224 + 8 x 98 crops, vs lightly + timm
#   data_loader the training DataLoader with 4/8/12 workers against the steps' images/s
#   drop_path   stochastic depth run on the kept subset vs as a mask, rates 0.1/0.3/0.4 (drop_path_mode=auto's rule)
#   train_e2e   ssl-distill train, ViT-S/14 default config, 100 iterations on JPEGs, against the step benchmark
#   (step_vits14 also traces 3 steps with torch.profiler: profile_*.txt, top CPU/CUDA ops and launches per step)
#   step_vitl14_compile                       the ViT-L/14 step with torch.compile per block vs eager (last: the
#                                             riskiest; it gets what is left of the budget, at most its limit)
# Results: DIR (default $OUT, else benchmarks/results/gpu_check) gets gpu_check.json (every step's status, time and
# results), gpu_check.md (the tables) and gpu_check.log (all output), rewritten after every step.
# --dry-run: every step on the CPU with tiny sizes (tests/test_gpu_check.py runs it); PYTHON picks the interpreter.
#
# Time limits (s), sized from the step FLOPs counted on the CPU (per image, bf16, 2 x 224 + 8 x 98 crops: ViT-S/14
# 144 GFLOP, B/14 510, L/14 1789) at the H200's ~790 TFLOP/s bf16 peak and 30-45 % MFU: ViT-L/14 at batch 32 is
# ~57 TFLOP, ~0.2 s a step; each benchmark also pays ~15 s of start-up (imports, CUDA context, model builds) and
# trims its timed rounds to its own --budget-s. Expected: wheels + env ~20 s, tests ~70, steps 30 + 35 + 60, data
# loader ~45 (24 s measured, --budget-s), compile <= 95: ~350 s. The limits add up to more than the budget on purpose: a step that hangs costs
# its own limit, and the budget then cuts the last ones (compile first).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
OUT_DIR="${OUT:-benchmarks/results/gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
START=$SECONDS
if [ "$DRY" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET_S:-1500}; else BUDGET=${GPU_CHECK_BUDGET_S:-470}; fi
SITE="$WORK/site" XSITE="$WORK/site-xformers"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

report() {
  cp "$WORK"/profile_*.txt "$OUT_DIR"/ 2>/dev/null
  "$PY" benchmarks/gpu_check_report.py --work "$WORK" --out "$OUT_DIR" --budget-s "$BUDGET" \
    --elapsed-s $((SECONDS - START)) $([ "$DRY" = 1 ] && echo --dry-run) >> "$LOG" 2>&1
}

# step NAME LIMIT_S NOTE COMMAND...: run COMMAND under `timeout` (its whole process group), cut to what is left of
# the budget; record name, status (ok | failed | timeout | skipped), seconds, limit and exit code; rewrite the report.
step() {
  local name=$1 limit=$2 note=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START) - 15))  # 15 s: the kill grace below and the last report
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS rc=0 status=ok
  if [ "$limit" -lt 5 ]; then
    status=skipped rc=-1 note="no time left in the ${BUDGET} s budget"
  else
    echo "=== $name (limit ${limit} s): $*" >> "$LOG"
    timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
  fi
  printf '{"name": "%s", "status": "%s", "seconds": %d, "limit_s": %d, "rc": %d, "note": "%s"}\n' \
    "$name" "$status" $((SECONDS - t0)) "$limit" "$rc" "$note" >> "$WORK/steps.jsonl"
  echo "=== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG"
  report
}

install_wheels() {  # $1: target dir, then wheel files (none: nothing to do)
  local target=$1
  shift
  mkdir -p "$target"
  [ $# -eq 0 ] && { echo "no wheels carried: using the packages installed"; return 0; }
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$target" "$@"
}
export -f install_wheels
export PY

shopt -s nullglob
wheels=(.gpu-wheels/*.whl)
optional=(.gpu-wheels/optional/*.whl)
step wheels 30 "${#wheels[@]} wheels: ${wheels[*]##*/}" \
  bash -c 'install_wheels "$@"' _ "$SITE" ${wheels[@]+"${wheels[@]}"}

if [ "$DRY" = 1 ]; then
  step env 30 "dry run: no xFormers probe" "$PY" benchmarks/gpu_env.py --out "$WORK/env.json"
else
  step xformers_wheel 15 "${optional[*]##*/}" \
    bash -c 'install_wheels "$@"' _ "$XSITE" ${optional[@]+"${optional[@]}"}
  step env 40 "" "$PY" benchmarks/gpu_env.py --out "$WORK/env.json" --probe-xformers "$XSITE"
fi
XF=0
if [ -e "$WORK/xformers_usable" ]; then XF=1; export PYTHONPATH="$XSITE:$PYTHONPATH"; fi

# --- 1. CUDA tests
tests=(tests/test_cuda.py tests/test_cuda_engine.py)
pytest_args=(-m cuda -q -rA -p no:cacheprovider --timeout 200 --junitxml "$WORK/pytest.xml" -o junit_family=legacy)
if [ "$DRY" = 1 ]; then
  step cuda_tests 900 "on the CPU (SSL_DISTILL_CUDA_TESTS_ON_CPU=1)" \
    env SSL_DISTILL_CUDA_TESTS_ON_CPU=1 "$PY" -m pytest "${pytest_args[@]}" "${tests[@]}"
else
  step cuda_tests 130 "" "$PY" -m pytest "${pytest_args[@]}" "${tests[@]}"
fi

# --- 2. train step: ours vs lightly + timm, and our variants
ts=(benchmarks/train_step.py --out-dir "$WORK" --patch-size 14 --local-size 98 --precision bf16 --warmup 2)
large_variants=(default flash cudnn efficient math no_packed checkpointing)  # SDPA backends forced: which suits?
[ "$XF" = 1 ] && large_variants=(default sdpa xformers flash cudnn efficient math no_packed checkpointing)
if [ "$DRY" = 1 ]; then  # tiny sizes on the CPU, same scripts and options otherwise
  ts=(benchmarks/train_step.py --out-dir "$WORK" --device cpu --precision bf16 --patch-size 8 --global-size 32
      --local-size 16 --local-crops 2 --prototypes 64 --batch 2 --warmup 0 --repeats 1 --arch vit_tiny)
  step step_vits14 300 "dry: vit_tiny" "$PY" "${ts[@]}" --variants default no_packed --tag vits14 --profile 1
  step step_vitb14 300 "dry: vit_tiny" "$PY" "${ts[@]}" --variants default --tag vitb14
  step step_vitl14 300 "dry: vit_tiny" "$PY" "${ts[@]}" --variants "${large_variants[@]}" --tag vitl14
else
  step step_vits14 50 "batch 64, profiled" "$PY" "${ts[@]}" --device cuda --arch vit_small --batch 64 --repeats 10 \
    --budget-s 25 --variants default no_packed --tag vits14 --profile 3
  step step_vitb14 45 "batch 64" "$PY" "${ts[@]}" --device cuda --arch vit_base --batch 64 --repeats 10 \
    --budget-s 30 --variants default no_packed --tag vitb14
  step step_vitl14 75 "batch 32" "$PY" "${ts[@]}" --device cuda --arch vit_large --batch 32 --repeats 8 \
    --budget-s 55 --variants "${large_variants[@]}" --tag vitl14
fi

# --- 3. can the data pipeline feed the step?
step_json=("$WORK"/train_step_*.json)
if [ "$DRY" = 1 ]; then
  step data_loader 300 "dry: 0 and 2 workers, tiny crops" "$PY" benchmarks/data_loader.py --device cpu \
    --workers 0 2 --batch 4 --patch-size 8 --global-size 32 --local-size 16 --local-crops 2 --images 16 \
    --image-size 64 48 --warmup-s 0.5 --seconds 1 --out-dir "$WORK" \
    --step-json ${step_json[@]+"${step_json[@]}"}
else
  step data_loader 60 "batch 64, 2 x 224 + 8 x 98, 24 s of measurement" "$PY" benchmarks/data_loader.py \
    --device cuda --workers 4 8 12 --batch 64 --warmup-s 2 --seconds 7 --budget-s 24 --batch-timeout-s 20 \
    --out-dir "$WORK" \
    --step-json ${step_json[@]+"${step_json[@]}"}
fi

# --- 4. stochastic depth: subset vs mask at the recipe's rates (what student.drop_path_mode=auto should pick)
if [ "$DRY" = 1 ]; then
  step drop_path 200 "dry: vit_tiny" "$PY" benchmarks/drop_path.py --device cpu --arch vit_tiny --patch-size 8 \
    --global-size 32 --local-size 16 --n-local 2 --batch 2 --repeats 1 --out-dir "$WORK"
else
  step drop_path 40 "ViT-S/14, batch 64, bf16" "$PY" benchmarks/drop_path.py --device cuda --arch vit_small \
    --patch-size 14 --local-size 98 --batch 64 --dtype bf16 --repeats 10 --budget-s 30 --out-dir "$WORK"
fi

# --- 5. end to end: ssl-distill train on JPEGs against the step benchmark (within 10 %?)
if [ "$DRY" = 1 ]; then
  step train_e2e 300 "dry: tiny config" "$PY" benchmarks/train_e2e.py --config configs/tiny_cpu.yaml \
    --arch vit_tiny --device cpu --batch 4 --workers 0 --iterations 6 --log-period 2 --images 16 \
    --image-size 64 48 --out-dir "$WORK" --step-json ${step_json[@]+"${step_json[@]}"}
else
  step train_e2e 100 "ViT-S/14 default config, batch 64, 14 workers, 100 iterations" "$PY" \
    benchmarks/train_e2e.py --device cuda --iterations 100 --workers 14 --images 1000 --timeout 90 \
    --out-dir "$WORK" --step-json ${step_json[@]+"${step_json[@]}"}
fi

# --- 2b. last, as the longest and least predictable: torch.compile per block vs eager (its first compilation
# dominates; it gets what is left of the budget, at most its limit)
if [ "$DRY" = 1 ]; then
  step step_vitl14_compile 400 "dry: vit_tiny" "$PY" "${ts[@]}" --drop-path 0 --no-baseline --warmup 1 \
    --variants default compile --tag vitl14_compile
else
  step step_vitl14_compile 95 "batch 32, drop path 0" "$PY" "${ts[@]}" --device cuda --arch vit_large --batch 32 \
    --repeats 8 --budget-s 80 --drop-path 0 --no-baseline --variants default compile --tag vitl14_compile
fi

report
echo "GPU check done in $((SECONDS - START)) s: $OUT_DIR/gpu_check.md" | tee -a "$LOG"
cat "$OUT_DIR/gpu_check.md"
! grep -qv '"status": "ok"' "$WORK/steps.jsonl"  # exit status 1 when any step did not end ok
