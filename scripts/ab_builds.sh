#!/usr/bin/env bash
# Same-machine A/B of kernel builds. Each device call may land on another H200, and this project has seen the
# same code differ by 3-7 % between machines, so a change is judged against its base built and timed on one.
#   here:   scripts/ab_builds.sh prepare REV [REV...]   copies each commit's tree into .ab/REV (git archive;
#           .ab/ is ignored), to travel with the device call as carry [".ab"]
#   device: scripts/ab_builds.sh run [bench_kernel.py args]   builds the working tree ("head") and every .ab/REV
#           side by side, then times them in rounds (head, REV..., head, REV...) with bench_kernel.py on the same
#           cells; ROUNDS (2), AB_HEADS (16,128) and AB_BATCHES (1,16) pick the size. Prints one line per cell,
#           build and round: "<build> <round> H=... B=... L=... <us> us ...".
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
[ $# -gt 0 ] && shift

case $mode in
  prepare)
    [ $# -gt 0 ] || { echo "usage: $0 prepare REV [REV...]"; exit 2; }
    for rev in "$@"; do
      name=$(git rev-parse --short "$rev") || exit 1
      rm -rf ".ab/$name" && mkdir -p ".ab/$name"
      git archive "$name" setup.py pyproject.toml csrc mla_patch scripts | tar -x -C ".ab/$name" || exit 1
      echo "prepared .ab/$name ($(git log -1 --format=%s "$name" | cut -c1-70))"
    done ;;
  run)
    export MLA_PATCH_CUDA_ARCHS=${MLA_PATCH_CUDA_ARCHS:-90a} PYTHONUNBUFFERED=1
    builds=(head)
    for d in .ab/*/; do [ -f "$d/setup.py" ] && builds+=("$(basename "$d")"); done
    # The builds share the machine's cores.
    export MAX_JOBS=$(( ($(nproc) + ${#builds[@]} - 1) / ${#builds[@]} ))
    t0=$(date +%s)
    for b in "${builds[@]}"; do
      dir=.; [ "$b" != head ] && dir=.ab/$b
      (cd "$dir" && python3 setup.py build_ext --inplace >"/tmp/ab_build_$b.log" 2>&1 \
        || { tail -20 "/tmp/ab_build_$b.log"; echo "BUILD FAILED: $b"; }) &
    done
    wait
    echo "built ${builds[*]} in $(( $(date +%s) - t0 )) s"
    root=$PWD
    for r in $(seq 1 "${ROUNDS:-2}"); do
      for b in "${builds[@]}"; do
        dir=$root; [ "$b" != head ] && dir=$root/.ab/$b
        (cd "$dir" && PYTHONPATH="$dir" python3 scripts/bench_kernel.py --out "/tmp/ab_${b}_$r" \
          --heads "${AB_HEADS:-16,128}" --batches "${AB_BATCHES:-1,16}" --kernels '' --fi-backends '' --ab '' \
          --no-ref "$@" 2>&1 | grep -E "^H=|copy bandwidth|Error|error" | cut -c1-90 | sed "s/^/$b $r /")
      done
    done
    echo "ab_builds done in $(( $(date +%s) - t0 )) s" ;;
  *)
    echo "usage: $0 prepare REV [REV...] | run [bench_kernel.py args]"; exit 2 ;;
esac
