"""Serving throughput through continuous batching (`model.generate_batch`), stock against patched.

Many concurrent requests: `--requests` prompts of `--prompt` tokens each generating `--new-tokens` tokens (with
--mixed, each request's prompt is drawn between half and the full `--prompt` and its output between a quarter and the
full `--new-tokens`: such a workload goes through the continuous-batching manager's add_request, one max_new_tokens
per request, as a server does; generate_batch takes one for all), on a model shape of benchmarks/models.py with random
bf16 weights (speed depends on the shapes). Stock and patched run the same requests on the same weights in one
process: stock first, then `mla_patch.patch(model)`. Per variant: wall time, requests/s, output tokens/s (end to
end, and in the decode phase: tokens after each request's first over the time from the first first token to the
last token), time to first token and per-token latency percentiles (transformers' per-token timestamps), the
latent pages' bytes per token and layer, how many decode tokens ran absorbed (mla_patch.decode_stats; steps
replayed from a CUDA graph run no Python, so they are counted as graph replays instead), and on the GPU the decode
phase's floor (the bytes a step of every request must read over the measured copy bandwidth). Variants (VARIANTS):
stock and patched with the default ContinuousBatchingConfig (for stock sdpa transformers captures no CUDA graphs; a
patched model's decode steps replay them, mla_patch/decode_fast_path.py), and patched with graphs turned off.
Writes serving.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: the repo root first, so `benchmarks` and `mla_patch` import
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import mla_patch
from benchmarks import models
from benchmarks.bench_generate import step_bytes
from benchmarks.provenance import commit
from benchmarks.timing import copy_bandwidth_gbs, percentile


def prompts_for(n, length, mixed, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen) if mixed else torch.full((n,), length)
    return [torch.randint(3, vocab, (int(k),), generator=gen).tolist() for k in lengths]


def output_lengths_for(n, new_tokens, mixed, seed=1):
    """Each request's max_new_tokens: all `new_tokens`, or (mixed) drawn between a quarter of it and all of it."""
    if not mixed:
        return [new_tokens] * n
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(max(1, new_tokens // 4), new_tokens + 1, (n,), generator=gen).tolist()


def _generate_mixed(model, prompts, output_lengths, generation, batching) -> dict:
    """generate_batch's loop with one max_new_tokens per request (the continuous-batching manager's add_request)."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(output_lengths),
                          num_requests=len(prompts))
    results = {}
    with model.continuous_batching_context_manager(generation_config=generation, continuous_batching_config=batching,
                                                   block=True, timeout=5, workload_hints=hints) as manager:
        ids = [manager.add_request(p, max_new_tokens=n, record_timestamps=True) for p, n in zip(prompts, output_lengths)]
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError(f"continuous batching stopped with {len(ids) - len(results)} requests unfinished")
    return {i: results[i] for i in ids}


# Variants: (patched, ContinuousBatchingConfig options). Patched with the defaults replays its decode steps from CUDA
# graphs on the GPU (mla_patch/decode_fast_path.py); patched-eager turns graphs off, as transformers' default for
# stock sdpa.
VARIANTS = {
    "stock": (False, {}),
    "patched": (True, {}),
    "patched-eager": (True, {"use_cuda_graph": False}),
}


def run(model, prompts, output_lengths, page_size, **options):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation = GenerationConfig(max_new_tokens=max(output_lengths), do_sample=False, eos_token_id=None, pad_token_id=0)
    batching = ContinuousBatchingConfig(page_size=page_size, **options)
    mla_patch.reset_decode_stats()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    replays = count_graph_replays()
    start = time.perf_counter()
    if len(set(output_lengths)) == 1:
        out = model.generate_batch(inputs=prompts, generation_config=generation, continuous_batching_config=batching,
                                   record_timestamps=True)
    else:
        out = _generate_mixed(model, prompts, output_lengths, generation, batching)
    wall = time.perf_counter() - start
    replays = replays()
    first = [o.timestamps[0] - start for o in out.values() if o.timestamps]
    gaps = [b - a for o in out.values() if o.timestamps for a, b in zip(o.timestamps, o.timestamps[1:])]
    last = max(o.timestamps[-1] for o in out.values() if o.timestamps) - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    decode_tokens = tokens - len(first)
    return {
        "wall_s": wall,
        "requests_per_s": len(prompts) / wall,
        "output_tokens_per_s": tokens / wall,
        "decode_tokens_per_s": decode_tokens / max(last - min(first), 1e-9),
        "ttft_s_p50": percentile(first, 50),
        "ttft_s_p90": percentile(first, 90),
        "token_ms_p50": 1e3 * percentile(gaps, 50),
        "token_ms_p90": 1e3 * percentile(gaps, 90),
        "token_ms_p99": 1e3 * percentile(gaps, 99),
        "failed": sum(o.error is not None for o in out.values()),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "absorbed_tokens": mla_patch.decode_stats()["absorbed_tokens"],  # eager steps; graph replays run no Python
        "cuda_graph_replays": replays,
        "tokens": {k: o.generated_tokens for k, o in out.items()},
    }


def count_graph_replays():
    """Counts the CUDA graph replays from now on (continuous batching's captured steps); call the result to stop."""
    if not torch.cuda.is_available():
        return lambda: 0
    replay, count = torch.cuda.CUDAGraph.replay, []

    def counted(graph):
        count.append(1)
        return replay(graph)

    torch.cuda.CUDAGraph.replay = counted

    def stop():
        torch.cuda.CUDAGraph.replay = replay
        return len(count)

    return stop


def latent_bytes_per_token(model) -> int:
    """Bytes a token takes in one layer's pages: kv_lora_rank + rope values in the model's dtype."""
    cfg = model.config
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.dtype.itemsize


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="v2-lite", choices=sorted(models.MODELS))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--mixed", action="store_true",
                    help="prompt lengths drawn between half and --prompt, output lengths between a quarter and --new-tokens")
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=0, help="keep this many decoder layers (0: the model's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="stock first, then patched variants")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:  # a few short requests: the whole CPU run in well under a minute
        args.requests, args.prompt, args.new_tokens = min(args.requests, 8), min(args.prompt, 128), min(args.new_tokens, 8)
        models.shrink(q_lora_rank=32, n_routed_experts=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=96,
                      moe_intermediate_size=32, vocab_size=97)
    if args.layers:
        models.MODELS[args.model]["num_hidden_layers"] = args.layers
    model = models.build(args.model, device)
    prompts = prompts_for(args.requests, args.prompt, args.mixed, model.config.vocab_size)
    output_lengths = output_lengths_for(args.requests, args.new_tokens, args.mixed)
    results = {"model": args.model, "requests": args.requests, "prompt": args.prompt, "mixed": args.mixed,
               "new_tokens": args.new_tokens, "output_lengths": output_lengths, "page_size": args.page_size, "commit": commit(),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "latent_bytes_per_token_layer": latent_bytes_per_token(model)}
    import transformers

    results["transformers"] = transformers.__version__
    if device == "cuda":  # the decode phase's floor: a step of every request at its mean context reads this much
        mean_context = sum(map(len, prompts)) / len(prompts) + sum(output_lengths) / len(output_lengths) / 2
        results["copy_gbs"] = copy_bandwidth_gbs()
        results["decode_step_floor_ms"] = step_bytes(model, len(prompts), mean_context) / results["copy_gbs"] / 1e6
        results["decode_floor_tokens_per_s"] = len(prompts) / results["decode_step_floor_ms"] * 1e3
    variants = args.variants.split(",")
    if variants[0] != "stock" or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants: stock first, then any of {sorted(VARIANTS)}")
    for variant in variants:  # stock first: patch() is not undone
        patched, options = VARIANTS[variant]
        if patched:
            mla_patch.patch(model)
        run(model, prompts[:2], [2, 2], args.page_size, **options)  # warm-up: first-call set-up, kernels loaded
        results[variant] = run(model, prompts, output_lengths, args.page_size, **options)
        row = {k: v for k, v in results[variant].items() if k != "tokens"}
        print(variant, json.dumps(row, default=float), flush=True)
    stock = results["stock"]
    for variant in variants[1:]:
        mine = results[variant]
        same = sum(stock["tokens"][k] == mine["tokens"].get(k) for k in stock["tokens"])
        mine.update(same_tokens_requests=same,
                    speedup_output_tokens=mine["output_tokens_per_s"] / stock["output_tokens_per_s"],
                    speedup_decode_tokens=mine["decode_tokens_per_s"] / stock["decode_tokens_per_s"])
        print(f"{variant}: output tokens/s {mine['speedup_output_tokens']:.2f}x stock, decode phase "
              f"{mine['speedup_decode_tokens']:.2f}x; requests with identical tokens {same}/{args.requests}")
    for variant in variants:
        results[variant].pop("tokens")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
