#!/usr/bin/env bash
# Compile-only check of csrc/ for CI machines without a GPU.
#   1. every csrc/*.cu with nvcc for sm_90a and sm_80 (no torch needed): errors fail the script;
#      register/spill/shared-memory usage is printed, and any spill fails it (the kernel is written
#      to keep its accumulators in registers), and so does a serialized wgmma pipeline (ptxas C751x).
#   2. csrc/binding.cpp syntax-checked against the installed torch's headers when torch imports
#      (a CPU-only torch is enough: binding.cpp includes only c10/cuda headers, not cuBLAS ones; the
#      one generated header CPU wheels lack, c10/cuda/impl/cuda_cmake_macros.h, is stubbed).
# Usage: dev/build_check.sh   (NVCC, CXX, MLA_PATCH_CUDA_ARCHS="90a;80" override)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
ARCHS=${MLA_PATCH_CUDA_ARCHS:-"90a;80"}
GENCODE=()
for a in ${ARCHS//[;,]/ }; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

status=0
for f in csrc/*.cu; do
  log="$tmp/$(basename "$f").log"
  # C++17: what the device image's torch (2.11) builds the extension with; newer torch uses C++20.
  if ! "$NVCC" -std=c++17 -O3 -lineinfo --use_fast_math --expt-relaxed-constexpr "${GENCODE[@]}" \
      --resource-usage -Icsrc -c "$f" -o "$tmp/$(basename "$f").o" >"$log" 2>&1; then
    echo "FAIL nvcc $f"; cat "$log"; status=1; continue
  fi
  # One summary line per kernel and arch: registers, spills, stack.
  awk -v f="$f" '/Compiling entry function/ {fn=$7; arch=$9} /spill stores/ {sp=$0} /Used [0-9]+ registers/ {
      match($0, /Used [0-9]+ registers/); r=substr($0, RSTART, RLENGTH);
      gsub(/^ +/, "", sp); printf "ok   %-28s %-9s %-20s %s  %s\n", f, arch, r, sp, substr(fn, 1, 50) }' "$log"
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >/dev/null; then
    echo "FAIL $f spills registers"; status=1
  fi
  # ptxas serializes every wgmma of a kernel (C7510-C7519 "Potential Performance Loss") when a register
  # of an in-flight wgmma is touched: the sm_90a path would run correct but several times slower.
  if grep -E "C751[0-9]\) Potential Performance Loss" "$log" >/dev/null; then
    grep -E "C751[0-9]" "$log"; echo "FAIL $f: wgmma serialized"; status=1
  fi
done

if python3 -c "import torch" >/dev/null 2>&1; then
  mkdir -p "$tmp/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  inc=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
  pyinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  cudainc=$(dirname "$(readlink -f "$(command -v "$NVCC")")")/../include
  for c in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ]; then cudainc=$c/include; break; fi
  done
  # shellcheck disable=SC2086
  if "$CXX" -std=c++20 -fsyntax-only -Wall -I"$tmp/stub" $inc -I"$pyinc" -I"$cudainc" -Icsrc \
      -DTORCH_EXTENSION_NAME=_C csrc/binding.cpp; then
    echo "ok   csrc/binding.cpp (syntax, torch $(python3 -c 'import torch; print(torch.__version__)'))"
  else
    echo "FAIL csrc/binding.cpp"; status=1
  fi
else
  echo "skip csrc/binding.cpp: torch is not importable here"
fi
exit $status
