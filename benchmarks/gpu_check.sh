#!/usr/bin/env bash
# GPU check (issue 12 item 5): on a machine with one NVIDIA GPU, in under 8 minutes,
#   1. set up: the machine's own python and torch (must be CUDA-enabled; nothing is
#      installed, nothing fetched); lowbit from this checkout through PYTHONPATH;
#   2. print and record the device, torch, CUDA and Triton facts;
#   3. run the CUDA test cases (`pytest -m cuda`: the "cuda" device parameter of
#      tests/conftest.py's available_devices(); skipped where there is no GPU);
#   4. check lowbit.coverage on CUDA (benchmarks/coverage_cuda.py: every GEMM of a backward
#      on the device thread seen, int8 and FP8 GEMMs counted as such);
#   5. time the FFN training step (benchmarks/bench_step.py --device cuda): fp32, bf16,
#      torchao float8 (a skipped row if torchao is not importable), lowbit int8
#      fqt-psq-8 and the FP8 recipes fqt-psq-fp8 and fp8-rowwise;
#   6. write JSON (and the logs) to $OUT if set, else benchmarks/results/gpu/.
# Each stage runs under `timeout` (worst case 30 + 30 + 30 + 170 + 50 + 170 s = 8 minutes);
# a stage that fails or times out is recorded in
# summary.json and the others still run. Exit status: 0 all stages passed, 1 a stage
# failed, 2 no usable CUDA device or torch (nothing is written then).
#
#   bash benchmarks/gpu_check.sh                    # from anywhere; PYTHON=... to pick python
#
# Environment: PYTHON (default python3), OUT, GPU_CHECK_MODES (comma list of bench_step
# modes), GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (seconds, default 170 / 170).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
MODES="${GPU_CHECK_MODES:-fp32,bf16,torchao-float8,fqt-psq-8,fqt-psq-fp8,fp8-rowwise}"
T_TESTS="${GPU_CHECK_TEST_TIMEOUT:-170}"
T_BENCH="${GPU_CHECK_BENCH_TIMEOUT:-170}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

die() { echo "gpu_check: $*" >&2; exit 2; }

# -- 1. set up: a CUDA-enabled torch and one visible GPU, or stop here ------------------------
command -v "$PY" >/dev/null 2>&1 || die "no python interpreter '$PY' (set PYTHON=...)"
probe="$(timeout 30 "$PY" -c '
import torch
print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()), torch.cuda.device_count())
' 2>&1)" || die "torch is not importable by $PY: ${probe##*$'\n'}"
read -r torch_v cuda_v cuda_ok n_gpu <<<"$(tail -n 1 <<<"$probe")"
if [ "$cuda_ok" != 1 ]; then
    die "no CUDA device: torch $torch_v (CUDA build: $cuda_v) sees no GPU. This script needs one NVIDIA GPU; on a CPU-only machine run the CPU benchmarks (docs/benchmarks.md)."
fi
timeout 30 "$PY" -c 'import lowbit' || die "lowbit does not import from $REPO with $PY"

OUTDIR="${OUT:-$REPO/benchmarks/results/gpu}"
mkdir -p "$OUTDIR" || die "cannot create the output folder $OUTDIR"
cd "$REPO" || die "cannot enter $REPO"
start=$(date +%s)
declare -A RC SECS

stage() {  # stage NAME TIMEOUT LOG CMD...: run CMD under timeout, tee its output to LOG
    local name=$1 limit=$2 log=$3 t0
    shift 3
    t0=$(date +%s)
    echo "== $name (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    RC[$name]=${PIPESTATUS[0]}
    SECS[$name]=$(( $(date +%s) - t0 ))
    [ "${RC[$name]}" = 124 ] && echo "gpu_check: stage $name timed out after ${limit}s" >&2
    echo "== $name: exit ${RC[$name]} in ${SECS[$name]}s"
}

# -- 2. facts ------------------------------------------------------------------------------
stage facts 30 "$OUTDIR/facts.log" "$PY" - "$OUTDIR/facts.json" <<'EOF'
import json, platform, subprocess, sys, time
import torch
import lowbit
from lowbit.kernels import fp8, int8

dev = torch.device("cuda")
p = torch.cuda.get_device_properties(dev)
def version(mod):
    try:
        return __import__(mod).__version__
    except Exception as exc:  # absent or broken: say so
        return f"not importable ({type(exc).__name__})"
def cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
facts = {
    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    "gpu": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
    "multiprocessors": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
    "gpus_visible": torch.cuda.device_count(),
    "driver": cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "triton": version("triton"), "torchao": version("torchao"), "python": platform.python_version(),
    "cpu_cores": __import__("os").cpu_count(),
    "lowbit_from": lowbit.__file__,
    "lowbit_commit": cmd("git", "rev-parse", "--short", "HEAD") or "not a git checkout",
    "int_mm_available": int8.available(dev), "scaled_mm_available": fp8.available(dev),
}
print(json.dumps(facts, indent=1))
json.dump(facts, open(sys.argv[1], "w"), indent=1)
EOF

# -- 3. the CUDA test cases ----------------------------------------------------------------
stage cuda_tests "$T_TESTS" "$OUTDIR/cuda_tests.log" \
    "$PY" -m pytest -m cuda -v -rs --durations=15 -p no:cacheprovider \
    --junitxml="$OUTDIR/cuda_tests.xml" tests  # -v: a timed-out run still shows how far it got

# -- 4. lowbit.coverage on CUDA -------------------------------------------------------------
stage coverage_cuda 50 "$OUTDIR/coverage_cuda.log" "$PY" benchmarks/coverage_cuda.py

# -- 5. the FFN step -----------------------------------------------------------------------
stage bench_ffn "$T_BENCH" "$OUTDIR/bench_ffn.log" \
    "$PY" benchmarks/bench_step.py --device cuda --workload ffn --modes "$MODES" --inprocess \
    --warmup 3 --steps 10 --rounds 5 --ceiling-n 4096 --json "$OUTDIR/bench_ffn.json"

# -- 6. summary ----------------------------------------------------------------------------
total=$(( $(date +%s) - start ))
"$PY" - "$OUTDIR" "$total" "${RC[facts]}" "${SECS[facts]}" "${RC[cuda_tests]}" "${SECS[cuda_tests]}" \
    "${RC[coverage_cuda]}" "${SECS[coverage_cuda]}" "${RC[bench_ffn]}" "${SECS[bench_ffn]}" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, total = sys.argv[1], int(sys.argv[2])
names = ("facts", "cuda_tests", "coverage_cuda", "bench_ffn")
stages = {n: {"exit": int(sys.argv[3 + 2 * i]), "seconds": int(sys.argv[4 + 2 * i]),
              "timed_out": int(sys.argv[3 + 2 * i]) in (124, 137)} for i, n in enumerate(names)}
xml = os.path.join(out, "cuda_tests.xml")
if os.path.exists(xml):
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    stages["cuda_tests"].update({k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
bench = os.path.join(out, "bench_ffn.json")
if os.path.exists(bench):
    rows = json.load(open(bench))["results"]
    stages["bench_ffn"]["ms_per_step"] = {r["mode"]: r["ms"] for r in rows}
summary = {"total_seconds": total, "passed": all(v["exit"] == 0 for v in stages.values()),
           "stages": stages}
print(json.dumps(summary, indent=1))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
echo "gpu_check: results in $OUTDIR (${total}s)"
for n in facts cuda_tests coverage_cuda bench_ffn; do [ "${RC[$n]}" = 0 ] || exit 1; done
exit 0
