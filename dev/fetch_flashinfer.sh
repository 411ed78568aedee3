#!/usr/bin/env bash
# Prepare here (network, nvcc 13.0, no GPU needed) what the GPU machine needs to time FlashInfer's MLA
# decode (the peer in benchmarks/bench_kernel.py, through benchmarks/peer_flashinfer.py), into the git-ignored
# .carry/flashinfer/wheels:
#   - apache-tvm-ffi (cp312 manylinux x86_64): the only runtime dependency of `import flashinfer` +
#     BatchMLAPagedAttentionWrapper(fa2/fa3) that the GPU image lacks (torch, numpy, ninja, filelock,
#     jinja2, packaging, requests, einops, click, tqdm, tabulate, nvidia-ml-py, cuda-bindings are there;
#     flashinfer's other Requires-Dist -- cuda-tile, nvidia-cutlass-dsl, nvidia-cudnn-frontend, nccl4py,
#     nccl-extensions, cuda-python -- are not imported on this path, hence not carried).
#   - flashinfer-python, REPACKED: the official py3-none-any wheel (62 MB) minus the CUDA sources of
#     data/csrc that no MLA module uses (-31 MB; the headers stay, so a JIT fallback for the MLA modules
#     still compiles there), plus the MLA decode modules compiled AHEAD OF TIME here for sm_90a:
#     bf16 q/kv/o, int32 indices, head_dim_ckv 512, head_dim_kpe 64, backends fa3 (Hopper) and fa2,
#     at flashinfer/data/aot/<uri>/<uri>.so. FlashInfer's JitSpec.try_load() loads a module found there
#     directly (flashinfer/jit/env.py get_aot_artifacts: FLASHINFER_AOT_DIR = <package>/data/aot), with
#     no ninja and no nvcc. (Its JIT cache, $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/<ver>/90a/
#     cached_ops, always goes through ninja, which needs nvcc and the build's absolute paths, so
#     carrying a prebuilt cache there is not a no-compile path.)
# The .so files link only libcudart.so.13 (already loaded by torch cu130), libstdc++, libgcc_s and libc,
# and take the TVMFFI* symbols from the carried tvm-ffi: they do not depend on the torch or Python
# version, so the CPU torch of a Python 3.11 venv here is enough to build them (checked below).
#
# Usage: dev/fetch_flashinfer.sh   (about 2 minutes on 2 cores; the work dir is $FI_WORK,
# default /tmp/fi_build; CUDA_HOME defaults to /usr/local/cuda). Prints the carried size (~32 MB).
#
# On the GPU machine (carry=[".carry"]), before running the benchmark:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
#     .carry/flashinfer/wheels/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH FLASHINFER_WORKSPACE_BASE=/tmp
# (FLASHINFER_WORKSPACE_BASE: where flashinfer writes its log and generated sources; optional if $HOME
# is writable. Add FLASHINFER_DISABLE_JIT=1 to forbid any nvcc fallback: a missing AOT module then
# fails with MissingJITCacheError, which bench_kernel.py records instead of compiling.)
# Quick check there: python3 benchmarks/bench_kernel.py --peer-only-check
set -euo pipefail
cd "$(dirname "$0")/.."

FI_VERSION=0.7.2.post1
TVM_FFI_VERSION=0.1.15.post2
TORCH_BUILD=torch==2.13.0            # CPU build, from this machine's disk; only imported by the JIT driver
out=.carry/flashinfer
wheels=$out/wheels
work=${FI_WORK:-/tmp/fi_build}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
grep -q "release 13.0" <<< "$("$CUDA_HOME/bin/nvcc" --version)" || echo "warning: nvcc is not 13.0" >&2

rm -rf "$wheels" && mkdir -p "$wheels" "$work/dl"
# 1. wheels: the official flashinfer wheel (repacked in step 4) and tvm-ffi for Python 3.12
pip download -q --no-deps -d "$work/dl" "flashinfer-python==$FI_VERSION"
pip download -q --no-deps -d "$wheels" --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "apache-tvm-ffi==$TVM_FFI_VERSION"

# 2. build venv (this machine's Python; the modules do not depend on it)
if [ ! -x "$work/venv/bin/python" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q "$TORCH_BUILD"
  "$work/venv/bin/pip" install -q "apache-tvm-ffi==$TVM_FFI_VERSION" numpy filelock jinja2 packaging requests \
    einops click tqdm tabulate nvidia-ml-py ninja
fi
"$work/venv/bin/pip" install -q --no-deps --force-reinstall "$work/dl/flashinfer_python-$FI_VERSION-py3-none-any.whl"

# 3. AOT-compile the MLA decode modules for sm_90a. nvcc links -lcuda from $CUDA_HOME/lib64/stubs;
#    where the toolkit has no stub, an empty one (soname libcuda.so.1) stands in (nothing uses it).
mkdir -p "$work/stubs"
[ -e "$CUDA_HOME/lib64/stubs/libcuda.so" ] || { : > "$work/stubs/e.c"; gcc -shared -fPIC -o "$work/stubs/libcuda.so" \
  -Wl,-soname,libcuda.so.1 "$work/stubs/e.c"; }
rm -rf "$work/ws"
FLASHINFER_CUDA_ARCH_LIST="9.0" FLASHINFER_WORKSPACE_BASE="$work/ws" FLASHINFER_NVCC_THREADS=2 \
FLASHINFER_EXTRA_LDFLAGS="-L$work/stubs" "$work/venv/bin/python" - "$work/aot" <<'EOF'
import os, shutil, sys, time
import torch
from flashinfer.jit.attention.modules import gen_batch_mla_module
dest = sys.argv[1]
shutil.rmtree(dest, ignore_errors=True)
for backend in ("fa3", "fa2"):
    t = time.time()
    spec = gen_batch_mla_module(backend, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32, 512, 64, False)
    spec.build()
    os.makedirs(os.path.join(dest, spec.name))
    shutil.copy2(spec.jit_library_path, os.path.join(dest, spec.name, spec.name + ".so"))
    print(f"AOT {backend}: {spec.name}.so built in {time.time() - t:.0f} s")
EOF
for so in "$work"/aot/*/*.so; do        # no libtorch / libpython / CUDA driver dependency
  if readelf -d "$so" | grep NEEDED | grep -E "torch|python|libcuda\.so|libc10"; then echo "bad deps: $so" >&2; exit 1; fi
done

# 4. repack the flashinfer wheel: drop unused CUDA sources, add the AOT modules, rewrite RECORD
"$work/venv/bin/python" - "$work/dl/flashinfer_python-$FI_VERSION-py3-none-any.whl" "$work/aot" "$wheels" \
  "$("$CUDA_HOME/bin/nvcc" --version | tail -1)" <<'EOF'
import base64, hashlib, os, sys, time, zipfile
src, aot, dest_dir, nvcc = sys.argv[1:5]
dest = os.path.join(dest_dir, os.path.basename(src))
CSRC = "flashinfer/data/csrc/"
def keep(name):
    if not name.startswith(CSRC):
        return True
    rel = name[len(CSRC):]
    if "/" in rel:
        return False                     # subdirectories: sources of other kernels
    return rel.startswith("batch_mla_") or rel.endswith((".h", ".cuh", ".hpp", ".inc", ".jinja"))
def digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
record, dropped = [], 0
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    for info in zin.infolist():
        if info.filename == record_name or info.is_dir():
            continue
        if not keep(info.filename):
            dropped += info.file_size
            continue
        data = zin.read(info)
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        record.append(f"{info.filename},{digest(data)},{len(data)}")
    added = ["mla_patch AOT modules (dev/fetch_flashinfer.sh), " + time.strftime("%Y-%m-%d") + ", " + nvcc,
             "FLASHINFER_CUDA_ARCH_LIST=9.0 (sm_90a); bf16; head_dim_ckv 512, head_dim_kpe 64; fa3 and fa2"]
    files = [("flashinfer/data/aot/MLA_PATCH_AOT.txt", ("\n".join(added) + "\n").encode())]
    for uri in sorted(os.listdir(aot)):
        with open(os.path.join(aot, uri, uri + ".so"), "rb") as f:
            files.append((f"flashinfer/data/aot/{uri}/{uri}.so", f.read()))
    for name, data in files:
        info = zipfile.ZipInfo(name, date_time=time.gmtime()[:6])
        info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        record.append(f"{name},{digest(data)},{len(data)}")
    record.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(record) + "\n", compress_type=zipfile.ZIP_DEFLATED)
print(f"repacked {os.path.basename(dest)}: dropped {dropped / 1e6:.0f} MB of CUDA sources, added {len(files) - 1} AOT modules")
EOF

# 5. check: the wheels install as the GPU command installs them, and flashinfer resolves the AOT modules
rm -rf "$work/site"
"$work/venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
  "$wheels"/flashinfer_python-*.whl
PYTHONPATH="$work/site" FLASHINFER_WORKSPACE_BASE="$work/ws_check" FLASHINFER_CUDA_ARCH_LIST="9.0" \
  "$work/venv/bin/python" - <<'EOF'
import flashinfer, torch
from flashinfer.jit.attention.modules import gen_batch_mla_module
assert "/site/flashinfer/" in flashinfer.__file__, flashinfer.__file__
for backend in ("fa3", "fa2"):
    spec = gen_batch_mla_module(backend, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32, 512, 64, False)
    assert spec.is_aot and spec.aot_path.exists(), (backend, spec.aot_path)
    print(f"check {backend}: flashinfer {flashinfer.__version__} finds the AOT module {spec.aot_path.name}")
EOF
ls -la "$wheels"
du -sh "$out"
