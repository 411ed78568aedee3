"""Measure the card's two ceilings: device-to-device copy bandwidth and dense bf16 matmul rate.

Copy: a 2 GiB buffer copied into another, bytes read plus written over the median time
(timing.copy_bandwidth_gbs).
Matmul: 8192^3 bf16 on random data (never zeros), 2*n^3 FLOPs over the median time.
Other scripts import `measure()`; run alone it prints and writes JSON (--out DIR). With --reads it also measures the
read-only rates the decode kernels live under (`measure_reads`, Triton): every SM sweeping an L2-resident buffer, and
one sweep of a 2 GiB one (HBM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

try:  # the read sweeps only (--reads); the device image's torch ships it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks.timing import copy_bandwidth_gbs, event_ms


def measure(n: int = 8192) -> dict:
    copy_gbs = copy_bandwidth_gbs()
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms_mm = event_ms(lambda: a @ b, iters=10)
    tflops = 2 * n**3 / (ms_mm * 1e-3) / 1e12
    props = torch.cuda.get_device_properties(0)
    return dict(
        device=torch.cuda.get_device_name(0),
        sms=props.multi_processor_count,
        l2_bytes=getattr(props, "L2_cache_size", 0),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        copy_gbs=copy_gbs,
        bf16_matmul_tflops=tflops,
    )


if triton is not None:

    @triton.jit
    def _sweep_kernel(x_ptr, out_ptr, n_words, sweeps, BLOCK: tl.constexpr):
        # Each program reads every grid-th block of the buffer, `sweeps` times, past L1 (a program's share of an
        # L2-sized buffer would fit in it), XOR-folding the words so that no load can be dropped; one store at the end.
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for _ in range(sweeps):
            for start in range(pid * BLOCK, n_words, step):
                acc ^= tl.load(x_ptr + start + tl.arange(0, BLOCK), cache_modifier=".cg")  # L2, not L1
        tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def measure_reads(l2_bytes: int = 16 << 20, l2_sweeps: int = 256, hbm_bytes: int = 2 << 30) -> dict:
    """Read-only GB/s: 4 programs an SM sweeping an L2-resident buffer (the L2-to-SM rate the decode loop's tile
    reads draw on) and one sweep of a buffer far larger than L2 (HBM)."""
    if triton is None:
        return {}
    block = 4096  # int32 words a program a step: 16 KB, four 16-byte loads a thread at 8 warps
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(4 * sms * block, dtype=torch.int32, device="cuda")
    res = {}
    for name, nbytes, sweeps in (("l2_read_gbs", l2_bytes, l2_sweeps), ("hbm_read_gbs", hbm_bytes, 1)):
        x = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")

        def run(x=x, sweeps=sweeps):
            _sweep_kernel[(4 * sms,)](x, out, x.numel(), sweeps, BLOCK=block, num_warps=8)

        res[name] = nbytes * sweeps / (event_ms(run) * 1e-3) / 1e9
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reads", action="store_true", help="also the read-only L2 and HBM rates (Triton)")
    args = ap.parse_args()
    res = measure()
    if args.reads:
        res.update(measure_reads())
    print(json.dumps(res, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ceilings.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
