#!/usr/bin/env bash
# One-shot GPU check on a machine with torch, timm and torchmetrics but no Ray/MLflow (no network).
# Prepare (ignored folders): wheels of diffusers, pydantic and their deps in .whl/ (see the device
# tool's README), and a copy of ../shared/bench/gpu_baseline.py in .gpu/. Then, from the repo root:
#   bash bench/gpu_check.sh                                              # on the GPU; results in $OUT
#   SMALL=1 WHEELS=0 PY=.venv/bin/python OUT=/tmp/o bash bench/gpu_check.sh   # CPU dry run
# Steps, each under `timeout` and a shared deadline (TOTAL_S, default 420 s):
#   0. install the carried wheels (.whl: diffusers, pydantic & deps) into $SITE, nvidia-smi
#   1. pytest -m gpu on the test files that hold gpu-marked tests          -> $OUT/pytest.log
#   2. python -m bench.areas.gpu --out $OUT   (histodiff_gpu.json)         -> $OUT/bench_gpu.log
#   3. .gpu/gpu_baseline.py (copy of ../shared/bench; gpu_anchor.json)     -> $OUT/baseline.log
# Everything else goes to $OUT/run.log. At most 7 files come back.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
SITE=${SITE:-/tmp/site}
SMALL=${SMALL:-0}
WHEELS=${WHEELS:-1}
TOTAL_S=${TOTAL_S:-420}
mkdir -p "$OUT"
LOG=$OUT/run.log
: >"$LOG"
DEADLINE=$((SECONDS + TOTAL_S))
say() { echo "[run.sh +${SECONDS}s] $*" | tee -a "$LOG"; }
cap() {  # cap NOMINAL: the step's timeout, never past the deadline (15 s kept for the summary)
  local left=$((DEADLINE - SECONDS - 15))
  echo $(($1 < left ? $1 : left))
}
step() {  # step NAME NOMINAL_S LOGFILE CMD...
  local name=$1 nominal=$2 logfile=$3; shift 3
  local t; t=$(cap "$nominal")
  if [ "$t" -lt 10 ]; then say "SKIP $name: no time left before the deadline"; return; fi
  say "START $name (timeout ${t}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$t" env PYTHONUNBUFFERED=1 "$@" >"$logfile" 2>&1
  local rc=$?
  say "END $name rc=$rc in $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  tail -n 25 "$logfile" | cut -c1-240 | sed "s/^/  [$name] /"
}

say "host $(hostname) $(nproc) CPUs; PY=$PY SMALL=$SMALL WHEELS=$WHEELS OUT=$OUT"
{ nvidia-smi || echo "nvidia-smi: not available"; } >>"$LOG" 2>&1
"$PY" -c "import importlib.metadata as m
for p in ('typing_extensions', 'zipp', 'huggingface_hub', 'safetensors', 'numpy', 'timm', 'pytest'):
    try: print('system', p, m.version(p))
    except Exception as e: print('system', p, 'MISSING', e)" >>"$LOG" 2>&1

# histodiff from platform/, the benchmarks and toys (package bench) from the repo root.
if [ "$WHEELS" = 1 ]; then
  t0=$SECONDS
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >>"$LOG" 2>&1; then
    say "FATAL: wheel install failed (see run.log)"; exit 1
  fi
  export PYTHONPATH=$SITE:$PWD/platform:$PWD
  say "wheels installed into $SITE in $((SECONDS - t0))s: $(ls .whl | tr '\n' ' ')"
else
  export PYTHONPATH=$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import sys, torch, diffusers, pydantic, timm
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'diffusers', diffusers.__version__,
      'pydantic', pydantic.VERSION, 'timm', timm.__version__)" 2>&1 | tee -a "$LOG"

# 1. gpu-marked tests. Two of them need packages this machine lacks (ray, mlflow): deselected when missing.
FILES=$(grep -l 'pytest.mark.gpu' tests/test_*.py | tr '\n' ' ')
DESELECT=()
if ! "$PY" -c "import mlflow" 2>/dev/null; then
  DESELECT+=(--deselect tests/test_tracking.py::test_champion_denoiser_loads_onto_cuda_and_runs_in_bf16)
fi
if ! "$PY" -c "import ray" 2>/dev/null; then
  DESELECT+=(--deselect tests/test_readers.py::test_tile_dataset_streams_onto_the_gpu)
fi
say "gpu test files: $FILES; deselected (missing mlflow/ray): ${DESELECT[*]:-none}"
# shellcheck disable=SC2086
step pytest-gpu 100 "$OUT/pytest.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors $FILES "${DESELECT[@]}"

# 2. histodiff's own GPU benchmark.
SMALL_ARG=(); [ "$SMALL" = 1 ] && SMALL_ARG=(--small)
step bench-gpu 150 "$OUT/bench_gpu.log" "$PY" -m bench.areas.gpu "${SMALL_ARG[@]}" --out "$OUT"

# 3. the plain diffusers baseline (writes $OUT/gpu_anchor.json after every figure; compile last).
# A CPU dry run skips its torch.compile probe (minutes on 2 cores) unless COMPILE=1.
BASE_ARGS=("${SMALL_ARG[@]}"); [ "$SMALL" = 1 ] && [ "${COMPILE:-0}" != 1 ] && BASE_ARGS+=(--no-compile)
step baseline 240 "$OUT/baseline.log" env OUT="$OUT" "$PY" .gpu/gpu_baseline.py "${BASE_ARGS[@]}"

say "summary (files in $OUT: $(ls "$OUT" | tr '\n' ' '))"
for f in histodiff_gpu.json histodiff_gpu_errors.json gpu_anchor.json; do
  [ -f "$OUT/$f" ] && { echo "== $f"; "$PY" -c "import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d.items():
    print(k, '=', json.dumps(v['value'] if isinstance(v, dict) and 'value' in v else v))" "$OUT/$f"; } | tee -a "$LOG"
done
say "done"
