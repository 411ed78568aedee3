#!/usr/bin/env bash
# The one GPU script: build the extension, disassembly check, kernel tests (slow ones too), benchmark.
# Everything lands in $OUT (default ./out): gpu.txt, build.log, pytest.log, kernel_errors.jsonl,
# bench.log, bench_kernel.json, bench_kernel.png (at most 8 files, as the device tool returns; KEEP_SO=1
# adds the built extension as the eighth, TIMELINE=... timeline.json instead).
# Usage: OUT=/some/dir dev/gpu_check.sh [--no-bench|--bench-only] [extra bench args]
# (extra bench args go to benchmarks/bench_kernel.py, e.g. --json after.json to keep a second build's grid apart)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Build time counts on the device: Hopper only there unless told otherwise.
export MLA_PATCH_CUDA_ARCHS=${MLA_PATCH_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-8}
mode=${1:-all}
[ $# -gt 0 ] && shift

t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1; echo "commit ${MLA_PATCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"; git status --short csrc 2>/dev/null; } >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [ "$mode" != "--bench-only" ] || ! ls mla_patch/_C*.so >/dev/null 2>&1; then
  rm -rf build mla_patch/_C*.so
  if ! python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  so=$(ls mla_patch/_C*.so)
  echo "built $so in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"
  [ -n "${KEEP_SO:-}" ] && cp "$so" "$OUT/"  # to carry into a later call instead of building again
  { echo "HMMA: $(cuobjdump -sass "$so" | grep -c HMMA)  HGMMA: $(cuobjdump -sass "$so" | grep -c HGMMA)  LDL/STL: $(cuobjdump -sass "$so" | grep -cE 'LDL|STL')"
    cuobjdump -res-usage "$so" 2>/dev/null | grep -E "Function|REG" | head -40; } | tee -a "$OUT/gpu.txt"
fi

if [ "$mode" != "--bench-only" ]; then
  rm -f "$OUT/kernel_errors.jsonl"
  # --noconftest: the kernel tests need none of the shared fixtures (keeps them independent of the patch code).
  MLA_PATCH_SLOW=1 MLA_PATCH_KERNEL_ERRLOG="$OUT/kernel_errors.jsonl" timeout ${KERNEL_TEST_TIMEOUT:-300} \
    python3 -m pytest -q --noconftest -p no:cacheprovider --durations=8 tests/test_kernel.py 2>&1 \
    | tee "$OUT/pytest.log" | tail -n 40
  [ "${PIPESTATUS[0]}" = 124 ] && echo "KERNEL TESTS TIMED OUT" | tee -a "$OUT/gpu.txt"
  # Worst cases: the error, its ratio to the reference op's own error in the dtype, and the fraction of the
  # tests' bound (2 x that error + 1e-4, tests/test_kernel.py) it uses; the ratio alone overstates cases whose
  # reference error is tiny, where the 1e-4 floor is what the test applies.
  python3 - "$OUT/kernel_errors.jsonl" <<'PY'
import json, sys, collections
worst = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, ""])
try:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        w = worst[r["dtype"]]
        if r["rel_err"] > w[0]: w[0], w[4] = r["rel_err"], r["case"]
        w[1] = max(w[1], r["rel_err"] / max(r["ref_rel_err"], 1e-12))
        w[2] = max(w[2], r["rel_err"] / (2.0 * r["ref_rel_err"] + 1e-4))
        w[3] = max(w[3], r["lse_abs_err"])
    for k, (e, ratio, bound, lse, case) in worst.items():
        print(f"{k}: max rel err {e:.2e} (at {case[:90]}), max ratio to reference-in-dtype {ratio:.2f}, "
              f"max fraction of the test bound {bound:.2f}, max lse abs err {lse:.1e}")
except FileNotFoundError:
    print("no error log")
PY
fi

# TIMELINE="H,B,L;...": per-CTA phase timelines of those cells (dev/kernel_timeline.py) into gpu.txt and
# timeline.json, before the benchmark.
if [ -n "${TIMELINE:-}" ]; then
  python3 dev/kernel_timeline.py --out "$OUT" --cells "$TIMELINE" --kernels "${TIMELINE_KERNELS:-default}" 2>&1 \
    | tee -a "$OUT/gpu.txt" | tail -n 200
fi

if [ "$mode" != "--no-bench" ]; then
  python3 benchmarks/bench_kernel.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 45
fi
echo "gpu_check done in $(( $(date +%s) - t0 )) s"
