#!/usr/bin/env bash
# A GPU session's measurements in one call: the machine's facts, `pytest -m gpu`, the
# benchmark suite under a wall-time budget, all packed into one archive under $OUT.
#
#   OUT=DIR bash benchmarks/gpu_session.sh [--budget SECONDS] [--test-timeout SECONDS]
#                                          [--workers N] [--parts LIST] [--codecs LIST]
#                                          [--skip-tests] [--quick]
#
# Run it from the project root. On the lent GPU machine, in the call that carries the
# bundle's last part (../shared/device/bundle prints that call):
#   mkdir -p /tmp/dw && mv .devwheels/pNN /tmp/dw/ && bash .devwheels/unpack.sh &&
#   bash benchmarks/gpu_session.sh --budget 300
# srpipe is not installed there: PYTHONPATH=/tmp/site:$PWD does it (set here).
#
# --budget      the suite's wall time (default 300 s); the whole call takes about that,
#               plus the tests (at most --test-timeout, default 180 s), plus ~30 s: give
#               the device call a timeout_s of budget + test timeout + 60
# --workers     the most CPU workers a loader gets (default: the cgroup CPU quota less one
#               when it is below the visible cores, else all cores but one)
# --parts       the suite's parts (default: its GPU default); a rerun on the same warm
#               machine reuses the packed database: --skip-tests --parts train,batch
# --codecs      the codecs part's databases (the suite's --codecs), e.g. raw:95
# --skip-tests  no `pytest -m gpu` (a rerun on the same machine)
# --quick       tiny sizes (the suite's --quick): the whole script end to end on a CPU
#
# Writes $OUT/gpu-session.tar.gz (re-packed after every stage, so a call cut short still
# brings back what was done) holding session/env.txt, pytest-gpu.log, suite.log and
# suite/ (results.md, plots, JSON lines, logs), and $OUT/summary.txt, also printed.
# Exit status: 0 when the tests and every suite step passed, 1 otherwise, 2 for bad usage.
# Output goes to files, never through `tee` (with worker processes it can hang).
set -u

usage() { sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_session.sh: $*" >&2; exit 2; }
number() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 expects a whole number, got '$2'"; }

BUDGET=300 TEST_TIMEOUT=180 WORKERS="" PARTS="" CODECS="" SKIP_TESTS=0 QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) [ $# -ge 2 ] || die "--budget needs a value"; number "$1" "$2"; BUDGET=$2; shift 2 ;;
    --test-timeout) [ $# -ge 2 ] || die "--test-timeout needs a value"; number "$1" "$2"
                    TEST_TIMEOUT=$2; shift 2 ;;
    --workers) [ $# -ge 2 ] || die "--workers needs a value"; number "$1" "$2"
               [ "$2" -ge 1 ] || die "--workers must be at least 1"; WORKERS=$2; shift 2 ;;
    --parts) [ $# -ge 2 ] || die "--parts needs a value"; PARTS=$2; shift 2 ;;
    --codecs) [ $# -ge 2 ] || die "--codecs needs a value"; CODECS=$2; shift 2 ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "${OUT:-}" ] || die "set OUT to the folder whose files come back (the device sets it)"
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
OUT=$(cd "$OUT" && pwd)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
[ -d /tmp/site ] && SITE=/tmp/site: || SITE=""
export PYTHONPATH="$SITE$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
RUN=$(mktemp -d /tmp/srpipe-session.XXXXXX)
RES=$RUN/session
mkdir -p "$RES"
T0=$SECONDS

pack() {  # the results so far, as one archive under $OUT (atomically replaced)
  tar -czf "$OUT/gpu-session.tar.gz.part" -C "$RUN" session &&
    mv "$OUT/gpu-session.tar.gz.part" "$OUT/gpu-session.tar.gz"
}

# -- 1. the machine: what changes the plan (cores vs quota, /dev/shm, the GPU, versions) --
cpu_quota() {  # whole CPUs the cgroup allows, or nothing when unlimited
  local q p
  if [ -r /sys/fs/cgroup/cpu.max ]; then
    read -r q p < /sys/fs/cgroup/cpu.max
  elif [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    q=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us); p=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)
  fi
  [ -n "${q:-}" ] && [ "$q" != max ] && [ "$q" -gt 0 ] 2>/dev/null && echo $(( (q + p - 1) / p ))
}
NPROC=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys those
QUOTA=$(cpu_quota)
if [ -z "$WORKERS" ] && [ -n "$QUOTA" ] && [ "$QUOTA" -lt "$NPROC" ]; then
  WORKERS=$(( QUOTA > 1 ? QUOTA - 1 : 1 ))
fi
SHM_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')

{
  echo "== date: $(date -u +%FT%TZ)   host kernel: $(uname -srm)"
  echo "== nproc: $NPROC   cgroup CPU quota: ${QUOTA:-none} ($(cat /sys/fs/cgroup/cpu.max \
    2>/dev/null || echo 'no cpu.max'))   loader workers: ${WORKERS:-all cores but one}"
  grep -m1 'model name' /proc/cpuinfo
  grep Cpus_allowed_list /proc/self/status
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" \
       "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
  echo "== memory"; free -g
  echo "== df -h /dev/shm /tmp"; df -h /dev/shm /tmp
  if [ -n "$SHM_KB" ] && [ "$SHM_KB" -lt 2097152 ]; then
    echo "WARNING: /dev/shm is under 2 GiB: the torch loader keeps ~750 MB there at 15 " \
         "workers x batch 64; lower --workers if its steps fail with a bus error"
  fi
  echo "== nvidia-smi"
  timeout 30 nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  echo "== python: $PY ($("$PY" --version 2>&1)); PYTHONPATH=$PYTHONPATH"
} > "$RES/env.txt" 2>&1

# What srpipe, its tests and benchmarks import, with the pip name to bundle when missing;
# then torch's view of the GPU and a first CUDA allocation.
timeout 120 "$PY" - >> "$RES/env.txt" 2>&1 <<'EOF'
import importlib
import re

NEEDED = {"torch": "torch", "numpy": "numpy", "lmdb": "lmdb", "nvidia.dali": "nvidia-dali-cuda120",
          "cv2": "opencv-python-headless", "PIL": "pillow", "click": "click", "tqdm": "tqdm",
          "skimage": "scikit-image", "matplotlib": "matplotlib", "pytest": "pytest",
          "pytest_timeout": "pytest-timeout"}
missing = []
print("== versions")
for mod, pip in NEEDED.items():
    try:
        m = importlib.import_module(mod)
        print(f"{mod:15s} {getattr(m, '__version__', '?')}  {getattr(m, '__file__', '')}")
    except Exception as e:  # noqa: BLE001 - any failure to import is worth one line
        print(f"{mod:15s} MISSING ({type(e).__name__}: {e})")
        missing.append(pip)
if missing:
    print("MISSING: " + " ".join(missing) + "  -> rebuild the bundle with them: "
          "../shared/device/bundle nvidia-dali-cuda120 lmdb " + " ".join(
              p for p in missing if p not in ("nvidia-dali-cuda120", "lmdb")))
try:  # `pip install --no-deps --no-build-isolation -e .` builds with the image's setuptools
    import setuptools
    v = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    try:
        import wheel  # noqa: F401  (setuptools < 70.1 needs it to build an editable wheel)
        has_wheel = True
    except ImportError:
        has_wheel = False
    ok = v >= (70, 1) or (v >= (64, 0) and has_wheel)
    print(f"setuptools {setuptools.__version__}, wheel {'yes' if has_wheel else 'no'}: "
          f"pip install --no-deps --no-build-isolation --no-index -e . "
          f"{'would work' if ok else 'would fail'}; this script uses PYTHONPATH instead")
except ImportError:
    print("setuptools MISSING: pip install -e . would fail; this script uses PYTHONPATH")
import torch
print("== torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
      torch.backends.cudnn.version(), "cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
    print("torch.ones(1).cuda():", torch.ones(1).cuda())
EOF
# What a torch loader worker pays per image, and what starting one costs: the first H100
# run's torch loader made half the probe's img/s per worker and took 60 s to start 15.
timeout 120 "$PY" - >> "$RES/env.txt" 2>&1 <<'EOF'
import time

import cv2
import numpy as np

from srdata.format import decode_image, encode_image
from srdata.samples import synthetic_image
cv2.setNumThreads(1)
print("== decoding one 512x512 JPEG q95 4:4:4, as packed (one thread)")
print([line.strip() for line in cv2.getBuildInformation().splitlines() if "JPEG:" in line])
buf = encode_image(synthetic_image(512, 512, 0), "jpeg", 95)
arr = np.frombuffer(buf, np.uint8)
for name, fn in (("cv2.imdecode to BGR", lambda: cv2.imdecode(arr, cv2.IMREAD_COLOR)),
                 ("srdata's decode_image (RGB)",
                  lambda: decode_image(buf, "jpeg", (512, 512, 3)))):
    fn()
    t = time.perf_counter()
    for _ in range(200):
        fn()
    print(f"{name}: {(time.perf_counter() - t) / 200 * 1e3:.2f} ms ({len(buf)} bytes)")
EOF
# As many at once as the torch loader starts workers (15 on the 16-core GPU machine); a
# fixed 15 took 21 s of a 2-core CI run to say what no run there starts.
STARTS=${WORKERS:-$(( NPROC > 1 ? NPROC - 1 : 1 ))}
{
  echo "== python -c 'import torch': alone, then $STARTS at once (the loader's workers)"
  timeout 120 "$PY" -c "import time; t = time.time(); import torch; print(f'alone: {time.time() - t:.1f} s')"
  t=$SECONDS
  for _ in $(seq "$STARTS"); do timeout 120 "$PY" -c "import torch" & done
  wait  # each has its timeout: no hang here can eat the device call
  echo "$STARTS at once: $((SECONDS - t)) s"
} >> "$RES/env.txt" 2>&1
echo "== facts took $((SECONDS - T0)) s" >> "$RES/env.txt"
pack

# -- 2. the GPU tests -------------------------------------------------------------------
TESTS="skipped (--skip-tests)" TESTS_RC=0
if [ "$SKIP_TESTS" = 0 ]; then
  t=$SECONDS
  # addopts without --strict-markers: without pytest-timeout its marker would stop collection
  timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -m gpu -q -o addopts=-ra -p no:cacheprovider \
    tests > "$RES/pytest-gpu.log" 2>&1
  rc=$? TESTS_RC=$rc
  TESTS="exit $rc in $((SECONDS - t)) s: $(grep -E '(passed|failed|skipped|error|deselected)' \
    "$RES/pytest-gpu.log" | tail -1)"
  [ "$rc" = 124 ] && TESTS="TIMED OUT after $TEST_TIMEOUT s (see pytest-gpu.log)"
  pack
fi

# -- 3. the suite, most valuable parts first, stopping before the budget runs out -------
ARGS=(--out "$RES/suite" --work /tmp/srpipe-suite-work --budget "$BUDGET")
[ "$QUICK" = 1 ] && ARGS+=(--quick)
[ -n "$WORKERS" ] && ARGS+=(--workers "$WORKERS")
[ -n "$PARTS" ] && ARGS+=(--parts "$PARTS")
[ -n "$CODECS" ] && ARGS+=(--codecs "$CODECS")
t=$SECONDS
# the suite stops itself within its budget; the timeout is for a hang it cannot see
timeout -k 10 $((BUDGET + 60)) "$PY" benchmarks/gpu_suite.py "${ARGS[@]}" \
  > "$RES/suite.log" 2>&1
rc=$?
SUITE="exit $rc in $((SECONDS - t)) s: $(grep '^suite finished' "$RES/suite.log" | tail -1)"
[ "$rc" = 124 ] && SUITE="TIMED OUT after $((BUDGET + 60)) s (see suite.log)"
pack

{
  echo "srpipe GPU session: $(date -u +%FT%TZ), $((SECONDS - T0)) s"
  grep -E '^(== nproc|GPU |== torch|nvidia.dali|WARNING|MISSING|setuptools)' "$RES/env.txt"
  echo "pytest -m gpu: $TESTS"
  echo "suite: $SUITE"
  echo "archive: $OUT/gpu-session.tar.gz (session/: env.txt pytest-gpu.log suite.log suite/)"
  echo
  [ -f "$RES/suite/results.md" ] && cat "$RES/suite/results.md"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
rm -rf "$RUN"
[ "$rc" = 0 ] && [ "$TESTS_RC" = 0 ]
