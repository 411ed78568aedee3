"""Measure the card's two ceilings: device-to-device copy bandwidth and dense bf16 matmul rate.

Copy: a 2 GiB buffer copied into another, bytes read plus written over the median time.
Matmul: 8192^3 bf16 on random data (never zeros), 2*n^3 FLOPs over the median time.
Other scripts import `measure()`; run alone it prints and writes JSON (--out DIR).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def _median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure(copy_bytes: int = 2 << 30, n: int = 8192) -> dict:
    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * copy_bytes / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms_mm = _median_ms(lambda: a @ b, iters=10)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res = measure()
    print(json.dumps(res, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ceilings.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
