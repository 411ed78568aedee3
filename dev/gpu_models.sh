#!/usr/bin/env bash
# The model-level GPU run: build the extension, the GPU model tests, the decode-threshold and the
# end-to-end generate benchmarks, the evals parity in bf16 and the main job on the GPU.
# Everything lands in $OUT (default ./out); each stage has its own time limit so one slow stage
# cannot hide the others. Usage: OUT=dir dev/gpu_models.sh [stages...]
#   stages: wheels build kernel kbench graph tests threshold generate parity demo serving mtp http
#   (default: build tests threshold generate parity demo). `wheels` first puts transformers 5.25 and the
#   server's wheels (.whl, carried; dev/fetch_serving_wheels.sh fetches them) in front for the stages after it:
#   `dev/gpu_models.sh wheels build mtp http` is what issue 23 still needs measured, about one 10-minute call
#   (`serving` in a call of its own; set MLA_PATCH_COMMIT to the local commit: the device's git HEAD is the
#   landed main). HTTP_ARGS replaces the HTTP benchmark's workload.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MLA_PATCH_CUDA_ARCHS=${MLA_PATCH_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-8}
stages=${*:-build tests threshold generate parity demo}
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/models.txt"

for stage in $stages; do
  case $stage in
    wheels)
      log wheels
      eval "$(dev/install_serving_wheels.sh)" || echo "WHEELS FAILED"
      python3 -c "import transformers; print('transformers', transformers.__version__)" | tee -a "$OUT/models.txt" ;;
    build)
      log build
      if ! ls mla_patch/_C*.so >/dev/null 2>&1; then
        python3 setup.py build_ext --inplace >/tmp/build_models.log 2>&1 || { tail -40 /tmp/build_models.log; echo "BUILD FAILED"; }
      fi
      python3 -c "import mla_patch; print(mla_patch.status())" | tee -a "$OUT/models.txt" ;;
    kernel)  # a quick pass over the kernel's dispatch paths before the model stages
      log kernel
      timeout 90 python3 -m pytest -q --noconftest -p no:cacheprovider -m "not slow" tests/test_kernel.py \
        -k "paths or dispatch or graph or compile or bad or edges" 2>&1 | tail -8 ;;
    kbench)
      log kbench
      timeout 60 python3 benchmarks/bench_kernel.py --out "$OUT" --heads ${KBENCH_HEADS:-128} --batches 1,16,64 --no-ref 2>&1 | tail -30 ;;
    graph)  # the CUDA-graph decode step against eager and stock at the issue's target point
      log graph
      timeout 75 python3 benchmarks/bench_generate.py --out "$OUT" --models v2-lite --batches 1,16 --contexts 16384 \
        --variants stock,patched,patched-graphs --ttft-max-tokens 0 2>&1 | grep -E "^\||skipped|built" | tail -12 ;;
    tests)
      log tests
      timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests --ignore=tests/test_kernel.py -x -s -k "gpu or kernel or cuda" \
        2>&1 | tee "$OUT/tests_gpu.log" | grep -E "passed|failed|error|rel err|SKIPPED|FAILED" | tail -20 ;;
    threshold)
      log threshold
      timeout 120 python3 dev/bench_threshold.py --heads 128 --batch 8 --context 4096 --json "$OUT/threshold.json" 2>&1 | tail -12 ;;
    generate)
      log generate
      timeout 330 python3 benchmarks/bench_generate.py --out "$OUT" 2>&1 | tee "$OUT/bench_generate.log" | grep -vE "^\[transformers\]" | tail -70 ;;
    parity)
      log parity
      if ! python3 -c "import lm_eval, datasets" 2>/dev/null && ls .carry/wheels/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl  # from dev/fetch_gpu_wheels.sh
      fi
      timeout 60 python3 -m mla_patch.evals.parity --device cuda --dtype bfloat16 --backend kernel --out "$OUT" 2>&1 | tail -25 ;;
    serving)  # generate_batch, mixed prompt and output lengths, stock vs patched
      log serving
      timeout 420 python3 benchmarks/bench_serving.py --model v2-lite --requests 64 --prompt 4096 --new-tokens 256 \
        --mixed --out "$OUT/serving" 2>&1 | grep -vE "^\[transformers\]" | tail -12 ;;
    mtp)
      log mtp
      timeout 360 python3 benchmarks/bench_mtp.py --out "$OUT" --prompts 1024,8192 --new-tokens 64 --repeats 3 2>&1 \
        | grep -vE "^\[transformers\]|Loading weights|Writing model" | tail -20 ;;
    http)  # transformers serve against mla_patch.serve (V2-Lite's layers, fewer of them: the save and loads fit a call)
      log http
      timeout 480 python3 benchmarks/bench_serving_http.py --out "$OUT/http" \
        ${HTTP_ARGS:---model v2-lite --layers 9 --requests 64 --prompt 4096 --new-tokens 128 --mixed} 2>&1 | tail -6 ;;
    demo)
      log demo
      timeout 40 python3 -m mla_patch.demo --device cuda 2>&1 | tail -14 ;;
  esac
done
log done
