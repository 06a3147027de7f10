#!/usr/bin/env bash
# spindle's GPU checks, run on the GPU machine from the stage that scripts/gpu-run builds
# (copied there as gpu-stage/run.sh). It needs no Rust toolchain and no network.
#
#   device:  run(carry=["gpu-stage"], command="GPU_RUN_EXPECT_GPU=1 bash gpu-stage/run.sh")
#   here:    OUT=/tmp/gpuout bash gpu-stage/run.sh     (rehearsal: every step skips)
#
# Steps, cheapest and most telling first, each under its own time cap (the caps add up to
# less than the budget, GPU_RUN_BUDGET_S, default 470 s):
#   1. machine: GPU detection, nvidia-smi, ldd of every binary, cuBLAS found and loadable,
#      compute-sanitizer found (a missing tool on a GPU machine is a failure)
#   2. smoke: one kernel test (kv_write) with CUDA_LAUNCH_BLOCKING=1
#   3. kernel tests with CUDA_LAUNCH_BLOCKING=1 (an asynchronous fault is blamed on the
#      launch that caused it)
#   4. engine tests (split decode, grouped prefill and block copies run only there), then
#      the fixtures' parity cases on the CPU and CUDA backends
#   5. memcheck over the kernel tests and over the engine's CPU-vs-CUDA tests
#   6. racecheck over the attention kernel tests
#   7. the gpu_attention benchmark, kernel v1 beside v2 (its CSV lands in $OUT)
#   8. the decode benchmark, whole steps and a forked tree against one thread at the 0.6b
#      and 1.7b shapes (decode.csv in $OUT; the tree's CSV appended to its log)
#
# Every step ends PASS, FAIL or SKIP (no GPU). The first line of $OUT/summary.txt is the
# verdict: PASS only when a GPU was found and every step passed; FAIL with the failed steps;
# NO GPU for a rehearsal on a machine without one. The exit status is 0 for PASS and for a
# clean rehearsal, 1 for FAIL. On a machine with a GPU (a device node, a driver library or
# nvidia-smi) SPINDLE_REQUIRE_GPU=1 is exported, so a test that cannot reach the GPU fails
# instead of printing SKIPPED, and a SKIPPED line still seen there fails its step.
#
# Knobs: OUT (logs; default ./gpu-out), GPU_RUN_BUDGET_S, BENCH_ARGS and DECODE_ARGS
# (default --quick),
# GPU_RUN_EXPECT_GPU=1 (finding no GPU is a failure: set it on the device),
# GPU_RUN_ASSUME_GPU=1 and GPU_RUN_CUBLAS_DIRS=dir:dir (used by scripts/gpu-run-selftest to
# plant failures: behave as on a GPU machine; search only these folders for cuBLAS).
set -uo pipefail

STAGE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-470}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# At most 8 files come back from the device: keep to these.
ENVLOG="$OUT/machine.txt"   # detection, nvidia-smi, ldd, tool paths
TESTLOG="$OUT/tests.txt"    # smoke, kernel and engine tests
SANLOG="$OUT/sanitizers.txt"
BENCHLOG="$OUT/bench.txt"
DECODELOG="$OUT/bench-decode.txt"
SUMMARY="$OUT/summary.txt"
: >"$ENVLOG"
: >"$TESTLOG"
: >"$SANLOG"
: >"$BENCHLOG"
: >"$DECODELOG"
: >"$TMP/steps"

FAILS=()
SKIPS=()
PASSES=()
step_line() { echo "$*" | tee -a "$TMP/steps"; }
pass() { PASSES+=("$1"); step_line "PASS  $1${2:+: $2}"; }
fail() { FAILS+=("$1"); step_line "FAIL  $1${2:+: $2}"; }
skip_nogpu() { SKIPS+=("$1"); step_line "SKIP  $1: no GPU on this machine${2:+ ($2)}"; }
elapsed() { echo $(($(date +%s) - START)); }
envlog() { echo "$*" >>"$ENVLOG"; }

# run_capped CAP LOG CMD...: CMD under `timeout min(CAP, time left - 5)`; 124 if no time.
run_capped() {
    local cap=$1 log=$2
    shift 2
    local left=$((BUDGET - $(elapsed) - 5))
    [ "$cap" -lt "$left" ] || cap=$left
    if [ "$cap" -le 5 ]; then
        echo "NOT RUN: the time budget ($BUDGET s) is spent: $*" >>"$log"
        return 124
    fi
    echo "\$ timeout $cap $*" >>"$log"
    local t0 rc=0
    t0=$(date +%s)
    timeout --kill-after=5 "$cap" "$@" >>"$log" 2>&1 || rc=$?
    echo "[rc=$rc after $(($(date +%s) - t0)) s]" >>"$log"
    return $rc
}

# The first existing file among the arguments (globs already expanded).
first_file() {
    local f
    for f in "$@"; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

# site-packages folders of every python on PATH (the venv's may not be the first).
site_dirs() {
    local py
    for py in $(type -ap python3 python 2>/dev/null | awk '!seen[$0]++'); do
        "$py" -c 'import site, sys
dirs = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()]
print("\n".join(d for d in dirs if d))' 2>/dev/null
    done
}

# ----------------------------------------------------------------- 1. the machine
envlog "== spindle GPU run $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
[ -f "$STAGE/build-info.txt" ] && cat "$STAGE/build-info.txt" >>"$ENVLOG"

HAVE_GPU=0
GPU_WHY=""
LIBCUDA=""
for f in $(ldconfig -p 2>/dev/null | awk '/libcuda\.so/{print $NF}') \
    /usr/local/nvidia/lib64/libcuda.so* /usr/local/nvidia/lib/libcuda.so* \
    /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/lib64/libcuda.so*; do
    if [ -f "$f" ]; then
        LIBCUDA=$f
        break
    fi
done
if [ -n "$LIBCUDA" ]; then
    # cudarc opens libcuda by name: make sure its folder is searched.
    export LD_LIBRARY_PATH="$(dirname "$LIBCUDA")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
SMI=$(command -v nvidia-smi || first_file /usr/local/nvidia/bin/nvidia-smi /usr/bin/nvidia-smi || true)
if [ -n "${GPU_RUN_ASSUME_GPU:-}" ]; then
    HAVE_GPU=1
    GPU_WHY="GPU_RUN_ASSUME_GPU is set (a planted test of this script)"
elif ls /dev/nvidia[0-9]* /dev/nvidiactl >/dev/null 2>&1; then
    HAVE_GPU=1
    GPU_WHY="device node $(ls /dev/nvidia[0-9]* /dev/nvidiactl 2>/dev/null | head -1)"
elif [ -n "$LIBCUDA" ]; then
    HAVE_GPU=1
    GPU_WHY="driver library $LIBCUDA"
elif [ -n "$SMI" ]; then
    HAVE_GPU=1
    GPU_WHY="nvidia-smi at $SMI"
fi
envlog "GPU detected: $HAVE_GPU${GPU_WHY:+ ($GPU_WHY)}; libcuda: ${LIBCUDA:-none}; nvidia-smi: ${SMI:-none}"
GPU_NAME="no GPU"
if [ "$HAVE_GPU" = 1 ]; then
    # A test that cannot reach the GPU now fails instead of printing SKIPPED.
    export SPINDLE_REQUIRE_GPU=1
    if [ -n "$SMI" ]; then
        run_capped 15 "$ENVLOG" "$SMI" || true
        run_capped 15 "$ENVLOG" "$SMI" --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
        GPU_NAME=$("$SMI" --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
    fi
    GPU_NAME=${GPU_NAME:-unknown GPU}
    pass "gpu" "$GPU_WHY; $GPU_NAME"
elif [ -n "${GPU_RUN_EXPECT_GPU:-}" ]; then
    fail "gpu" "GPU_RUN_EXPECT_GPU is set but no device node, driver library or nvidia-smi was found"
else
    skip_nogpu "gpu" "no device node, driver library or nvidia-smi"
fi

# Paths: the binaries carry this checkout's paths; the tests read these instead.
export SPINDLE_FIXTURES="$STAGE/tests/fixtures"
export SPINDLE_SCRATCH="$TMP/scratch"
export SPINDLE_BENCH_DIR="$OUT"
mkdir -p "$SPINDLE_SCRATCH"
BINS=(gpu_kernels gpu_engine gpu_attention)
bins_ok=1
for b in "${BINS[@]}"; do
    f="$STAGE/bin/$b"
    if [ ! -f "$f" ]; then
        fail "binary $b" "missing from $STAGE/bin"
        bins_ok=0
        continue
    fi
    chmod +x "$f" # the carry may drop executable bits
    envlog "== ldd $b"
    ldd "$f" >>"$ENVLOG" 2>&1 || true
    missing=$(ldd "$f" 2>/dev/null | awk '/not found/{print $1}' | tr '\n' ' ')
    if [ -n "$missing" ]; then
        fail "binary $b" "libraries not found: $missing"
        bins_ok=0
    fi
done
[ "$bins_ok" = 1 ] && pass "binaries" "${BINS[*]} present, executable, every library found"
[ -d "$SPINDLE_FIXTURES" ] || fail "fixtures" "$SPINDLE_FIXTURES missing"

# cuBLAS (cudarc opens libcublas.so.13 at run time): found and loadable, or stop.
cublas_dirs() {
    if [ -n "${GPU_RUN_CUBLAS_DIRS+set}" ]; then
        tr ':' '\n' <<<"$GPU_RUN_CUBLAS_DIRS"
        return
    fi
    local d
    for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
        /opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib \
        /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib; do
        echo "$d"
    done
    site_dirs | while read -r d; do
        echo "$d/nvidia/cu13/lib"
        echo "$d/nvidia/cublas/lib"
    done
    timeout 20 find / -xdev \( -path /proc -o -path /sys -o -path "$STAGE" \) -prune -o \
        -name 'libcublas.so.13*' -print 2>/dev/null | xargs -r -n1 dirname
}
# Loads a shared library the way cudarc will (dlopen), with this LD_LIBRARY_PATH.
dlopen_probe() {
    local py
    py=$(command -v python3 || command -v python || true)
    if [ -n "$py" ]; then
        "$py" -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$1" 2>&1
    else
        ! ldd "$1" 2>&1 | grep 'not found'
    fi
}
CUBLAS=""
while read -r d; do
    [ -n "$d" ] || continue
    lib=$(first_file "$d"/libcublas.so.13* || true)
    [ -n "$lib" ] || continue
    envlog "cuBLAS candidate: $lib"
    if err=$(LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" dlopen_probe "$lib"); then
        CUBLAS=$lib
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        break
    fi
    envlog "  does not load: $err"
done < <(cublas_dirs | awk '!seen[$0]++')
CUBLAS_OK=1
if [ -n "$CUBLAS" ]; then
    pass "cuBLAS" "$CUBLAS loads"
elif [ "$HAVE_GPU" = 1 ]; then
    fail "cuBLAS" "no loadable libcublas.so.13 (looked in the torch venv, /usr/local/cuda*, every python's site-packages, then find /)"
    CUBLAS_OK=0
else
    skip_nogpu "cuBLAS" "none found, none needed without a GPU"
fi

# compute-sanitizer: PATH, the CUDA toolkit, the python wheels, then find.
SAN=$(command -v compute-sanitizer ||
    first_file /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer \
        /opt/nvidia/*/compute-sanitizer /opt/nvidia/*/*/compute-sanitizer ||
    site_dirs | while read -r d; do first_file "$d"/nvidia/cu13/bin/compute-sanitizer \
        "$d"/nvidia/cuda_sanitizer_api/compute-sanitizer/compute-sanitizer && break; done ||
    true)
if [ -z "$SAN" ]; then
    SAN=$(timeout 20 find / -xdev \( -path /proc -o -path /sys \) -prune -o -name compute-sanitizer \
        -type f -perm -u+x -print 2>/dev/null | head -1)
fi
envlog "compute-sanitizer: ${SAN:-not found}"
if [ -n "$SAN" ]; then
    envlog "$("$SAN" --version 2>&1 | tail -1)"
fi

STOPPED=""
if [ "$HAVE_GPU" = 1 ] && [ "$CUBLAS_OK" = 0 ]; then
    # Every engine test and the GEMM test need cuBLAS on a GPU machine: stop here.
    STOPPED="stopped after the machine checks: no loadable cuBLAS (libcublas.so.13)"
    step_line "STOP  $STOPPED"
fi

# ----------------------------------------------------------------- test steps

# test_step NAME CAP LOG CMD...: runs a libtest binary (--nocapture) and judges it.
test_step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local slog="$TMP/step.log" rc=0
    : >"$slog"
    run_capped "$cap" "$slog" "$@" || rc=$?
    { echo "===== $name"; cat "$slog"; } >>"$log"
    local result nskip npass first
    result=$(grep -E '^test result:' "$slog" | tail -1)
    nskip=$(grep -c '^SKIPPED: ' "$slog")
    npass=$(grep -E '^test result:' "$slog" | sed -nE 's/.* ([0-9]+) passed.*/\1/p' | awk '{s+=$1} END {print s+0}')
    first=$(grep -m1 -E "panicked at|^test .* FAILED|error|Error" "$slog" | cut -c1-200)
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        fail "$name" "timed out (cap ${cap} s); ${result:-no result line}"
    elif [ "$rc" != 0 ]; then
        fail "$name" "exit $rc; ${result:-no result line}; ${first:-see the log}"
    elif [ -z "$result" ]; then
        fail "$name" "no 'test result' line"
    elif [ "$npass" = 0 ]; then
        fail "$name" "no test ran ($result)"
    elif [ "$HAVE_GPU" = 1 ] && [ "$nskip" != 0 ]; then
        fail "$name" "$nskip tests printed SKIPPED on a GPU machine; $result"
    elif [ "$HAVE_GPU" = 0 ]; then
        skip_nogpu "$name" "ran on the CPU: $result; $nskip SKIPPED lines"
    else
        pass "$name" "$result"
    fi
}

# san_step NAME CAP TOOL CMD...: a test binary under compute-sanitizer.
san_step() {
    local name=$1 cap=$2 tool=$3
    shift 3
    if [ "$HAVE_GPU" = 0 ]; then
        skip_nogpu "$name" "compute-sanitizer ${SAN:+found at $SAN}${SAN:-not found}"
        return
    fi
    if [ -z "$SAN" ]; then
        fail "$name" "compute-sanitizer not found (PATH, /usr/local/cuda*, /opt/nvidia, site-packages, find /)"
        return
    fi
    local slog="$TMP/step.log" rc=0
    : >"$slog"
    run_capped "$cap" "$slog" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 20 "$@" || rc=$?
    { echo "===== $name"; cat "$slog"; } >>"$SANLOG"
    local summary result npass
    summary=$(grep -E 'ERROR SUMMARY' "$slog" | tail -1)
    result=$(grep -E '^test result:' "$slog" | tail -1)
    npass=$(sed -nE 's/^test result: .* ([0-9]+) passed.*/\1/p' <<<"$result")
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        fail "$name" "timed out (cap ${cap} s); ${summary:-no ERROR SUMMARY}"
    elif [ "$rc" != 0 ]; then
        fail "$name" "exit $rc; ${summary:-no ERROR SUMMARY}; ${result:-no result line}"
    elif ! grep -qE 'ERROR SUMMARY: 0 errors' <<<"$summary"; then
        fail "$name" "${summary:-no ERROR SUMMARY line}"
    elif [ -z "$result" ] || [ "${npass:-0}" = 0 ]; then
        fail "$name" "no test ran under the sanitizer (${result:-no result line})"
    else
        pass "$name" "$summary; $result"
    fi
}

K="$STAGE/bin/gpu_kernels"
E="$STAGE/bin/gpu_engine"
B="$STAGE/bin/gpu_attention"
P="$STAGE/bin/parity"
D="$STAGE/bin/decode"
T=(--nocapture --test-threads=1)

if [ -z "$STOPPED" ]; then
    # 2. smoke: one kernel, synchronous launches.
    test_step "smoke (kv_write, CUDA_LAUNCH_BLOCKING=1)" 40 "$TESTLOG" \
        env CUDA_LAUNCH_BLOCKING=1 "$K" --exact kv_write_scatters_rows "${T[@]}"
    # 3. every kernel test, synchronous launches.
    test_step "kernel tests (CUDA_LAUNCH_BLOCKING=1)" 75 "$TESTLOG" \
        env CUDA_LAUNCH_BLOCKING=1 "$K" "${T[@]}"
    # 4. the engine on the GPU, then the fixtures' parity cases on both backends.
    test_step "engine tests" 75 "$TESTLOG" "$E" "${T[@]}"
    test_step "parity tests (CPU and CUDA)" 40 "$TESTLOG" "$P" "${T[@]}"
    # 5. memcheck: kernels, then the engine's CPU-vs-CUDA programs (split decode with small
    #    partitions, grouped prefill, copy-on-write block copies).
    SPINDLE_FORKED_CASES=6 san_step "memcheck kernel tests" 75 memcheck "$K" \
        --skip forked_v2_long_shared_prefixes "${T[@]}"
    san_step "memcheck engine tests" 60 memcheck "$E" cuda_matches_cpu_step_by_step "${T[@]}"
    # 6. racecheck over the attention kernels (shared-memory staging and reductions).
    #    Kernel v2: two random trees (several tiles, rows and merge rows), not only the
    #    one-tile shape check.
    SPINDLE_FORKED_CASES=2 san_step "racecheck attention kernels" 50 racecheck "$K" \
        decode_gqa4_d128_multi_split prefill_gqa4_d128 decode_limits_beside_chunk_boundaries \
        forked_v2_rejects_bad_shapes forked_v2_matches_cpu_on_random_trees "${T[@]}"
    # 7. the benchmark (BENCH_ARGS, default --quick; its CSV goes to $OUT).
    bench_name="bench gpu_attention"
    rows_re='^ *[0-9]+ +[0-9]+ +[0-9]+ \|'
    rc=0
    # shellcheck disable=SC2086
    run_capped 60 "$BENCHLOG" "$B" ${BENCH_ARGS:---quick} || rc=$?
    if [ "$rc" != 0 ]; then
        fail "$bench_name" "exit $rc; $(grep -m1 -E 'gpu_attention:|rror' "$BENCHLOG" | cut -c1-200)"
    elif grep -q '^SKIPPED' "$BENCHLOG"; then
        if [ "$HAVE_GPU" = 1 ]; then
            fail "$bench_name" "skipped on a GPU machine"
        else
            skip_nogpu "$bench_name" "printed SKIPPED"
        fi
    elif ! grep -qE "$rows_re" "$BENCHLOG"; then
        fail "$bench_name" "no result rows"
    else
        pass "$bench_name" "$(grep -cE "$rows_re" "$BENCHLOG") shapes"
    fi
    # 8. whole decode steps (DECODE_ARGS, default --quick; 0.6b and 1.7b shapes, their
    #    random checkpoints written first; CSV to $OUT).
    bench_name="bench decode"
    rc=0
    # shellcheck disable=SC2086
    run_capped 90 "$DECODELOG" "$D" ${DECODE_ARGS:---quick} || rc=$?
    if [ "$rc" != 0 ]; then
        fail "$bench_name" "exit $rc; $(grep -m1 -E 'decode:|rror' "$DECODELOG" | cut -c1-200)"
    elif grep -q 'SKIPPED the GPU' "$DECODELOG"; then
        if [ "$HAVE_GPU" = 1 ]; then
            fail "$bench_name" "skipped the GPU shapes on a GPU machine"
        else
            skip_nogpu "$bench_name" "printed SKIPPED"
        fi
    elif ! grep -qE '^[0-9a-z.]+ +cuda ' "$DECODELOG"; then
        fail "$bench_name" "no cuda result rows"
    else
        pass "$bench_name" "$(grep -cE '^[0-9a-z.]+ +cuda ' "$DECODELOG") cuda rows"
    fi
    # The tree section's CSV goes into the log (its table is there too): the device
    # returns at most 8 files from $OUT, and the bundle already writes 8.
    if [ -f "$OUT/decode_tree.csv" ]; then
        { echo "== decode_tree.csv"; cat "$OUT/decode_tree.csv"; } >>"$DECODELOG"
        rm -f "$OUT/decode_tree.csv"
    fi
    rm -rf "$SPINDLE_SCRATCH/decode-models"
fi

# ----------------------------------------------------------------- verdict
total=$((${#PASSES[@]} + ${#FAILS[@]} + ${#SKIPS[@]}))
if [ -n "$STOPPED" ]; then
    verdict="FAIL: $STOPPED"
    status=1
elif [ ${#FAILS[@]} -gt 0 ]; then
    verdict="FAIL: ${#FAILS[@]} of $total steps failed: $(
        IFS=';'
        echo "${FAILS[*]}"
    )"
    status=1
elif [ "$HAVE_GPU" = 1 ]; then
    verdict="PASS: all $total steps passed on $GPU_NAME"
    status=0
else
    verdict="NO GPU: rehearsal only, ${#SKIPS[@]} of $total steps skipped for want of a GPU, none failed (this is not a GPU result)"
    status=0
fi
{
    echo "$verdict"
    echo "== steps ($(elapsed) s of a $BUDGET s budget)"
    cat "$TMP/steps"
    echo "== bench"
    grep -E '^GPU:|^ *[0-9]+ +[0-9]+ +[0-9]+ \||^SKIPPED|^CSV' "$BENCHLOG"
    echo "== bench decode"
    grep -E '^[0-9a-z.]+ +(cuda|cpu) |SKIPPED' "$DECODELOG"
    echo "== logs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} >"$SUMMARY"
echo
cat "$SUMMARY"
exit $status
