#!/usr/bin/env bash
# The one script for a lent GPU machine, run from the repository root (tracked files plus the
# carried, git-ignored .whl/ folder): every step has a time limit, and the whole script ends
# within GPU_CHECK_LIMIT_S seconds (default 540, 9 minutes).
#
#   1. transformers 5.23 (what the tests use) from .whl/*.whl into /tmp/site, ahead on PYTHONPATH
#      (.whl/: transformers 5.23.0, huggingface_hub 2.4.0 and what it imports that a machine
#      with transformers 5.17 may lack; no network needed there). .whl/ is git-ignored: make it
#      here, where pip reaches an index, and carry it ([".whl"]):
#        pip download --no-deps -d .whl transformers==5.23.0 huggingface_hub==2.4.0 click==8.5.1 \
#          hf-xet==1.8.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 anyio==4.16.0 \
#          h11==0.16.0 idna==3.21
#        pip download --no-deps -d .whl/build setuptools==84.2.1
#   2. kvfix built in place for sm_90 only (KVFIX_REQUIRE_CUDA=1), build_info printed (a
#      machine without setuptools gets .whl/build/setuptools-*.whl for the build only);
#   3. the CUDA op tests (`pytest tests -k cuda`) and tests/test_hf_cuda.py, side by side;
#   4. `python3 -m bench.gpu --out $OUT/GPU.md` with what is left of the time (at least
#      BENCH_MIN_S, default 210, is kept for it: the tests' limits shrink first);
#   5. a short summary.
# Logs go to $OUT (default /tmp/gpu_check_out): env.log, pip.log, build.log, pytest_cuda.log,
# pytest_hf_cuda.log, bench.log, and GPU.md (copy it to docs/GPU.md and commit).
#
#   bash scripts/gpu_check.sh            # on the device, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-540}
BENCH_MIN=${BENCH_MIN_S:-210}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SUMMARY=()

left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
say() { printf '\n== %s (t=%ss)\n' "$*" "$(( $(date +%s) - T0 ))"; }
# limit MAX RESERVE: at most MAX seconds, leaving RESERVE seconds for what follows
limit() { local t=$(( $(left) - $2 )); (( t > $1 )) && t=$1; echo "$t"; }
verdict() {  # NAME RC SECONDS
  local v="ok"
  [ "$2" = 124 ] || [ "$2" = 137 ] && v="TIMED OUT"
  [ "$2" != 0 ] && [ "$v" = ok ] && v="FAILED (exit $2)"
  SUMMARY+=("$1: $v, $3 s")
}
step() {  # NAME MAX RESERVE CMD...: runs CMD with a limit, output to the console and $OUT/NAME.log
  local name=$1 t; t=$(limit "$2" "$3"); shift 3
  if (( t < 15 )); then SUMMARY+=("$name: skipped (no time left)"); return 99; fi
  say "$name (limit ${t}s)"
  local s; s=$(date +%s)
  timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  verdict "$name" "$rc" "$(( $(date +%s) - s ))"
  return "$rc"
}

# ------------------------------------------------------------------------------------------
step env 60 0 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  $PY -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO GPU\")'; \
  command -v nvcc && nvcc --version | tail -2; command -v ninja; nproc"

if ls .whl/*.whl >/dev/null 2>&1; then
  step pip 90 0 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  SUMMARY+=("pip: no .whl/ folder: the machine's own transformers is used")
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import transformers, huggingface_hub; print('transformers', transformers.__version__, transformers.__file__, '| huggingface_hub', huggingface_hub.__version__)" 2>&1 | tee -a "$OUT/pip.log"

# ------------------------------------------------------------------------------------------
# sm_90 only: the device time goes to measuring. setup.py finds the toolkit (CUDA_HOME,
# /usr/local/cuda, or the nvcc on PATH) and fails here rather than building CPU kernels only.
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} KVFIX_REQUIRE_CUDA=1
build_path=$PYTHONPATH
if ! "$PY" -c "import setuptools" 2>/dev/null && ls .whl/build/setuptools-*.whl >/dev/null 2>&1; then
  # only for the build (.whl/build/: a setuptools wheel, in case the machine has none)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-build .whl/build/setuptools-*.whl
  build_path=/tmp/site-build:$PYTHONPATH
  SUMMARY+=("setuptools: none on the machine, .whl/build's used for the build")
fi
step build 300 $(( BENCH_MIN + 60 )) env PYTHONPATH="$build_path" "$PY" setup.py build_ext --inplace
build_rc=$?
step build_info 60 0 "$PY" -c "import kvfix, json; i = kvfix.build_info(); print(json.dumps(i)); \
assert i['cuda_available'], 'kvfix cannot run CUDA here'"
info_rc=$?

if [ "$build_rc" = 0 ] && [ "$info_rc" = 0 ]; then
  # ------------------------------------------------------------------------------------------
  # the two test runs side by side (each pytest uses 2 CPU threads, tests/conftest.py)
  t=$(limit 200 "$BENCH_MIN")
  if (( t >= 30 )); then
    say "CUDA tests side by side: pytest -k cuda, tests/test_hf_cuda.py (limit ${t}s each)"
    s=$(date +%s)
    ( timeout -k 10 "$t" "$PY" -m pytest -q -x -p no:cacheprovider tests -k "cuda and not test_hf_cuda" \
        > "$OUT/pytest_cuda.log" 2>&1; echo $? > "$OUT/.rc_pytest_cuda" ) &
    ( timeout -k 10 "$t" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_hf_cuda.py \
        > "$OUT/pytest_hf_cuda.log" 2>&1; echo $? > "$OUT/.rc_pytest_hf_cuda" ) &
    wait
    for name in pytest_cuda pytest_hf_cuda; do
      echo "-- $name.log (last lines)"; tail -n 15 "$OUT/$name.log"
      verdict "$name" "$(cat "$OUT/.rc_$name" 2>/dev/null || echo 1)" "$(( $(date +%s) - s ))"
      SUMMARY[-1]+=" | $(grep -E '(passed|failed|error|skipped|deselected)' "$OUT/$name.log" | tail -n 1)"
      rm -f "$OUT/.rc_$name"
    done
  else
    SUMMARY+=("pytest: skipped (no time left)")
  fi

  # ------------------------------------------------------------------------------------------
  budget=$(( $(left) - 40 ))  # bench.gpu's own clock starts after its imports
  step bench 600 10 "$PY" -m bench.gpu --out "$OUT/GPU.md" --budget-s "$budget"
else
  SUMMARY+=("tests and bench: not run (no CUDA build)")
  [ -f "$OUT/build.log" ] && { echo "-- build.log (last lines)"; tail -n 40 "$OUT/build.log"; }
fi

# ------------------------------------------------------------------------------------------
say "summary ($(( $(date +%s) - T0 )) s of ${LIMIT})"
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/bench.log" ] && grep -E "^[0-9]+ sections in|^  (target|failed/skipped): " "$OUT/bench.log" | head -n 50
ls "$OUT"
