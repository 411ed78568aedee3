"""Where a continuous-batching decode step's time goes: torch.profiler over generate_batch's decode phase.

Runs benchmarks/bench_serving.py's setup (a model shape of benchmarks/models.py, random bf16 weights), patched
unless --stock, warms up, then profiles one generate_batch of --requests prompts generating --new-tokens each and
prints the top operators by CUDA and by CPU time, and the profiled wall time per decode step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import mla_patch
from benchmarks import bench_serving, models


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="v2-lite", choices=sorted(models.MODELS))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--stock", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    model = models.build(args.model, "cuda")
    if not args.stock:
        mla_patch.patch(model)
    prompts = bench_serving.prompts_for(args.requests, args.prompt, False, model.config.vocab_size)
    bench_serving.run(model, prompts[:2], [2, 2], 256)
    bench_serving.run(model, prompts, [2] * len(prompts), 256)  # the prefill alone, so the profile below is mostly decode
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        result = bench_serving.run(model, prompts, [args.new_tokens] * len(prompts), 256)
        wall = time.perf_counter() - start
    print(f"wall {wall:.2f} s, per-token ms p50 {result['token_ms_p50']:.1f}, absorbed {result['absorbed_tokens']}")
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=args.rows))
    print(table.table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
