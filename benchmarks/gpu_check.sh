#!/usr/bin/env bash
# Issue 9's GPU checks as one prepared command, for a GPU machine with no network.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      (from the repository root; OUT_DIR: $OUT, else
#                                           ./gpu-check-out)
#
# 1. Installs the wheels in $WHEELS (default .whl/, else ../shared/wheels: pytest,
#    pytest-asyncio and their needs) into /tmp/site, offline, and puts it and the checkout on
#    PYTHONPATH. Where pytest and pytest-asyncio are already importable, wheels are optional.
# 2. `python3 -m pytest -q -m cuda` on the test modules that hold CUDA tests, under a time
#    limit; without trio, its legs are deselected (-k "not trio"), and a module that fails to
#    collect does not stop the others.
# 3. `python3 -m benchmarks --only gpu`, under a time limit: the report and the raw figures.
# 4. A short summary: versions, the device, the test counts, every goal of the gpu scenario.
# 5. The probes (PROBES=0 skips them): `python3 -m benchmarks.gpu_small_profile` and
#    `python3 -m benchmarks.gpu_arena_probe`, each under a time limit.
#
# Everything lands in OUT_DIR (at most 9 files): summary.txt, machine.txt, pytest-cuda.log,
# pytest-cuda.xml, benchmarks.log, benchmarks-gpu.md, gpu.json, gpu_small_profile.txt,
# gpu_arena_probe.txt. The exit status is 0 only when the tests and the benchmark both ran to the
# end and passed (goals not met, and the probes, do not fail it). To draw the plots of the run
# on a machine with matplotlib: copy gpu.json to benchmarks/results/gpu.json and run
# `python -m benchmarks.plots benchmarks/results/gpu.json --img-dir docs/img/gpu`.
#
# ASTAGE_REVISION names the revision in the reports, where the machine's copy of .git is not the
# tree's (the GPU lending tool's is older): pass it from the checkout, e.g.
# `ASTAGE_REVISION=abc1234 benchmarks/gpu_check.sh "$OUT"`.
#
# Time limits in seconds (the whole device budget is ~15 minutes, start-up included):
# PYTEST_TIMEOUT (220), BENCH_TIMEOUT (300), TEST_TIMEOUT (60, one test's limit), PROBE_TIMEOUT
# (90, each probe). BENCH_ARGS adds
# arguments (e.g. "--quick", "--repeats 1"); PYTEST_ARGS replaces the test modules (e.g.
# "tests/test_cuda_paths.py").
set -u
cd "$(dirname "$0")/.."

out=${1:-${OUT:-gpu-check-out}}
mkdir -p "$out"
python=${PYTHON:-python3}
pytest_timeout=${PYTEST_TIMEOUT:-220}
bench_timeout=${BENCH_TIMEOUT:-300}
test_timeout=${TEST_TIMEOUT:-60}
probe_timeout=${PROBE_TIMEOUT:-90}
export PYTHONUNBUFFERED=1
started=$(date +%s)

say() { echo "gpu_check: $*" | tee -a "$out/summary.txt"; }
: >"$out/summary.txt"

# -- 1. packages, offline ------------------------------------------------------------------------
wheels=${WHEELS:-.whl}
[ -d "$wheels" ] || wheels=../shared/wheels
if compgen -G "$wheels/*.whl" >/dev/null; then
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl; then
        export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
        say "installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into /tmp/site"
    else
        say "pip could not install the wheels in $wheels; trying with what is installed"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
else
    say "no wheels in $wheels; using what is installed"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "revision: ${ASTAGE_REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    "$python" - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python:", platform.python_version())
for name in ("torch", "anyio", "uvloop", "trio", "pytest", "pytest-asyncio", "hypothesis",
             "pytest-timeout", "safetensors"):
    try:
        print(f"{name}:", md.version(name))
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
print("cuda:", torch.version.cuda, "available:", torch.cuda.is_available())
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"device {index}: {props.name}, {props.total_memory / (1 << 30):.0f} GiB")
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 || true
    echo "ulimit -l: $(ulimit -l)"
} >"$out/machine.txt" 2>&1
sed 's/^/  /' "$out/machine.txt" | tee -a "$out/summary.txt"

if ! "$python" -c "import pytest, pytest_asyncio" 2>/dev/null; then
    say "pytest or pytest-asyncio is missing: copy ../shared/wheels to .whl/ and carry it"
fi

# -- 2. the CUDA tests ---------------------------------------------------------------------------
select=()
if ! "$python" -c "import trio" 2>/dev/null; then
    select=(-k "not trio")
    say "trio is not installed: its legs are deselected"
fi
# The modules that hold CUDA tests, named: the others are not even imported (and cannot fail to
# collect for want of a package the GPU machine lacks). PYTEST_ARGS replaces the list.
if [ -n "${PYTEST_ARGS:-}" ]; then
    read -r -a targets <<<"$PYTEST_ARGS"
else
    mapfile -t targets < <(grep -l 'mark\.cuda' tests/test_*.py benchmarks/tests/test_*.py)
fi
say "pytest -m cuda on ${targets[*]} (limit ${pytest_timeout} s)"
# SIGINT first: pytest stops and still prints (and writes) what ran so far.
timeout --signal=INT --kill-after=10 "$pytest_timeout" \
    "$python" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors \
    -o faulthandler_timeout="$test_timeout" -o timeout="$test_timeout" -rfEs "${select[@]}" \
    --junitxml="$out/pytest-cuda.xml" "${targets[@]}" >"$out/pytest-cuda.log" 2>&1
tests_rc=$?
[ $tests_rc -eq 124 ] && say "pytest ran out of its ${pytest_timeout} s"
say "pytest exit status $tests_rc; $(grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)' \
    "$out/pytest-cuda.log" | tail -n 1)"
grep -E '^(FAILED|ERROR) ' "$out/pytest-cuda.log" | head -n 40 | tee -a "$out/summary.txt"

# -- 3. the gpu benchmark scenario ---------------------------------------------------------------
say "python -m benchmarks --only gpu (limit ${bench_timeout} s)"
# shellcheck disable=SC2086
timeout --kill-after=10 "$bench_timeout" \
    "$python" -m benchmarks --only gpu --out "$out/benchmarks-gpu.md" --json "$out/gpu.json" \
    --no-plots --max-wait 10 ${BENCH_ARGS:-} >"$out/benchmarks.log" 2>&1
bench_rc=$?
[ $bench_rc -eq 124 ] && say "the benchmark ran out of its ${bench_timeout} s"
say "benchmark exit status $bench_rc"
[ $bench_rc -eq 0 ] || tail -n 30 "$out/benchmarks.log" | tee -a "$out/summary.txt"

# -- 4. the goals --------------------------------------------------------------------------------
if [ -s "$out/gpu.json" ]; then
    "$python" - "$out/gpu.json" <<'EOF' | tee -a "$out/summary.txt"
import json
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    gpu = json.load(f)["scenarios"]["gpu"]
if gpu.get("skipped"):
    print(gpu["skipped"])
verdicts = {True: "met", False: "NOT MET", None: "context"}
for check in gpu["checks"]:
    ratio = "" if check["ratio"] is None else f" ({check['ratio']:.2f}x)"
    print(
        f"  [{verdicts[check['met']]:>7}] {check['metric']}: {check['astage']} vs "
        f"{check['reference']}{ratio}; goal {check['goal']}"
    )
EOF
fi
# -- 5. the probes -------------------------------------------------------------------------------
# What the next change to the device path needs, in the same device time: where a cached call
# over small device tensors spends it, and what a scatter-free gather would gain. PROBES=0 skips.
if [ "${PROBES:-1}" != 0 ]; then
    for probe in gpu_small_profile gpu_arena_probe; do
        timeout --kill-after=10 "$probe_timeout" "$python" -m "benchmarks.$probe" \
            >"$out/$probe.txt" 2>&1
        say "$probe exit status $? (limit ${probe_timeout} s): $out/$probe.txt"
    done
    sed -n '/small tensors on/,$p' "$out/gpu_arena_probe.txt" | tee -a "$out/summary.txt"
fi
say "done in $(($(date +%s) - started)) s; results in $out"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
