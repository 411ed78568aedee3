"""Where the host time of generate(use_mtp=True) goes: cProfile over one call, stock and patched.

Builds bench_mtp.py's checkpoint (a shape of benchmarks/models.py with one MTP layer, random bf16 weights), then per
variant loads it, warms up with one generate(use_mtp=True) and profiles a second; prints the call's wall time and the
functions with the most own time and the most cumulative time. On CUDA the host waits for the GPU inside whatever
reads a device value, so a sync shows up as that function's own time.

    python dev/profile_mtp.py [--model v3-128h] [--prompt 1024] [--new-tokens 64] [--rows 30]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import mla_patch
from benchmarks import bench_mtp, models
from benchmarks.timing import sync


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="v3-128h", choices=sorted(models.MODELS))
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="stock,patched")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    experts = None if device.type == "cuda" else "eager"
    with tempfile.TemporaryDirectory(prefix="profile_mtp_") as path:
        layers = bench_mtp.save_with_mtp(args.model, path, device)
        for variant in args.variants.split(","):
            mla_patch.unpatch()
            if variant == "patched":
                mla_patch.patch()
            model = bench_mtp.load(path, layers, device, experts)
            ids = torch.randint(3, min(1000, model.config.vocab_size), (1, args.prompt), device=device)
            bench_mtp._generate(model, ids, "mtp", args.new_tokens)
            sync()
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            bench_mtp._generate(model, ids, "mtp", args.new_tokens)
            sync()
            profiler.disable()
            print(f"== {variant}: generate(use_mtp=True), L={args.prompt}, {args.new_tokens} tokens: "
                  f"{time.perf_counter() - start:.3f} s", flush=True)
            for key in ("tottime", "cumulative"):
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.rows)
                lines = text.getvalue().splitlines()
                start_at = next(i for i, line in enumerate(lines) if "ncalls" in line)
                print(f"-- by {key}")
                print("\n".join(line[:190] for line in lines[start_at:] if line.strip()), flush=True)
            del model
            gc.collect()
    mla_patch.unpatch()


if __name__ == "__main__":
    main()
