"""End-to-end decode speed and KV memory: stock transformers vs patched (PyTorch op, CUDA kernel).

    python scripts/bench_generate.py --out out/ [--quick]

Models are built from configs with RANDOM bf16 weights on the GPU (meta-device init, then
materialized): real shapes, not real weights, which is what decode speed depends on.
  v2-lite : DeepSeek-V2-Lite shape (hidden 2048, 27 layers, 16 heads, kv_lora 512, no q_lora,
            64 routed experts top-6 + 2 shared, first layer dense).
  v3-128h : a DeepSeek-V3-shaped 128-head attention stack (hidden 7168, q_lora 1536, kv_lora
            512), 4 layers with a small dense MLP so it fits and runs quickly.
The cache is filled with L random latent tokens (the same for every variant) instead of a real
prefill, so contexts up to 32K cost no prefill time; time to first token is measured separately
by a real prefill at small sizes. A decode step = one forward of one new token per sequence,
timed with CUDA events (median of several steps; the cache is cropped back after each).
Variants: stock (transformers as is: the latent DynamicCache, re-expanded through kv_b_proj
every step), patched-torch (absorbed, PyTorch op), patched-kernel (absorbed, our CUDA kernel),
patched-kernel-merged (absorb="merged": W_UQ.W_UK and W_UV.W_O materialized),
patched-kernel-graph (the kernel step captured once in a CUDA graph on a static cache) and
stock-graph (stock's step captured the same way: what graph capture alone gives vanilla).
Writes bench_generate.json and bench_generate.png to --out and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time

import torch

import mla_patch
from mla_patch import CACHE_KWARG

MODELS = {
    "v2-lite": dict(family="deepseek_v2", hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                    q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                    v_head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
                    num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, vocab_size=102400),
    "v3-128h": dict(family="deepseek_v3", hidden_size=7168, num_hidden_layers=4, num_attention_heads=128,
                    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                    v_head_dim=128, intermediate_size=2048, first_k_dense_replace=4, vocab_size=32000,
                    n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, rope_interleave=True),
}


def build(name: str, device):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

    spec = dict(MODELS[name])
    family = spec.pop("family")
    cls = DeepseekV2Config if family == "deepseek_v2" else DeepseekV3Config
    config = cls(num_key_value_heads=spec["num_attention_heads"], max_position_embeddings=65536, **spec)
    config._attn_implementation = "sdpa"
    with init_empty_weights():  # parameters on the meta device; buffers (rotary inv_freq) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
            else:
                p.fill_(1.0)  # norm weights
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return model.eval()


def _fill(cache, model, batch, context, device):
    """Append `context` random latent tokens to every layer of `cache`."""
    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(context + batch)
    for layer_idx in range(cfg.num_hidden_layers):
        c = torch.randn(batch, 1, context, cfg.kv_lora_rank, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(batch, 1, context, cfg.qk_rope_head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        cache.update(c, k, layer_idx)
    return cache


def _rewind(cache, tokens=1):
    """Drop the last `tokens` cached tokens (StaticLayer has no crop() in transformers 5.17)."""
    for layer in cache.layers:
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.sub_(tokens)
        else:
            layer.crop(-tokens)


def _median_ms(times):
    return sorted(times)[len(times) // 2]


class _Timer:
    """CUDA events on the GPU; a synchronized wall clock elsewhere (the --smoke run on CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_decode(model, cache, batch, context, steps, device, graph=False):
    """Median ms of one decode step; with graph=True also the replay's logits rel err against eager."""
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, 1), device=device)
    pos = torch.full((batch, 1), context, device=device)
    with torch.no_grad():
        if graph:
            return _time_graph(model, cache, ids, pos, steps)
        times = []
        for i in range(steps + 2):
            with _Timer(device) as timer:
                model(input_ids=ids, position_ids=pos, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
            _rewind(cache)
            if i >= 2:
                times.append(timer.ms)
    return _median_ms(times), None


def _time_graph(model, cache, ids, pos, steps):
    """Capture one decode step on a StaticCache (its length is a device tensor) and replay it.

    Capture records the cache's length increment without running it, so no rewind follows the
    capture; each replay runs it and is rewound. The first replay is checked against an eager step.
    """
    def step():
        return model(input_ids=ids, position_ids=pos, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)

    eager = step().logits.float()
    _rewind(cache)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph
            step()
            _rewind(cache)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step().logits
    graph.replay()
    torch.cuda.synchronize()
    check = ((captured.float() - eager).norm() / eager.norm()).item()
    _rewind(cache)
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        _rewind(cache)
        times.append(start.elapsed_time(end))
    del graph
    return _median_ms(times), check


def variant_cache(variant, model, batch, context):
    from transformers import DynamicCache, StaticCache

    if variant == "stock":
        return DynamicCache(config=model.config)
    if variant.endswith("graph"):
        return StaticCache(config=model.config, max_cache_len=context + 8)
    return mla_patch.LatentCache(config=model.config, initial_capacity=context + 8)


def _skip_reason(variant, batch, context, args):
    if variant == "stock" and batch * context > args.stock_max_tokens:
        return "over --stock-max-tokens (its step re-expands the whole cache)"
    if variant == "patched-torch" and batch * context > 8 * 16384:
        return "the PyTorch op is measured up to 128K cached tokens"
    if variant == "patched-kernel-merged" and context != 4096:
        return "absorb='merged' is compared with per-head at L=4K only"
    if variant.endswith("graph") and batch > 16:
        return "graph capture is measured up to batch 16"
    if variant == "stock-graph" and batch * context > 65536:
        return "stock's captured step re-expands the whole cache inside the graph: measured up to 64K cached tokens"
    return None


def run_point(model, name, variant, batch, context, steps, device):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    cache = _fill(variant_cache(variant, model, batch, context), model, batch, context, device)
    if cuda:
        cache_bytes = torch.cuda.memory_allocated() - base
    else:  # the smoke run: count the cache tensors
        cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                          for t in ((layer.buffer,) if hasattr(layer, "buffer") else (layer.keys, layer.values)))
        cache_bytes = cache_bytes * context // max(cache.layers[0].keys.shape[-2], context)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before_step = torch.cuda.memory_allocated() if cuda else 0
    ms, graph_vs_eager = time_decode(model, cache, batch, context, steps, device, graph=variant.endswith("graph"))
    transient = torch.cuda.max_memory_allocated() - before_step if cuda else 0
    del cache
    gc.collect()
    layers = model.config.num_hidden_layers
    return dict(model=name, variant=variant, batch=batch, context=context, ms_per_step=ms,
                tokens_per_s=batch * 1e3 / ms, kv_bytes_per_token_per_layer=cache_bytes / (batch * context * layers),
                step_transient_bytes=transient, graph_vs_eager_rel_err=graph_vs_eager)


def profile_step(model, name, batch, context, device):
    """Where a patched decode step's GPU time goes, by kernel family, and how much is launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    cache = _fill(mla_patch.LatentCache(config=model.config, initial_capacity=context + 8), model, batch, context, device)
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, 1), device=device)
    pos = torch.full((batch, 1), context, device=device)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, position_ids=pos, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
            _rewind(cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with _Timer(device) as timer:
                model(input_ids=ids, position_ids=pos, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    buckets = {}
    for evt in prof.key_averages():
        gpu_us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if gpu_us <= 0:
            continue
        key = evt.key.lower()
        if "mla" in key and "decode" in key or "splitkv" in key or "combine" in key:
            bucket = "attention kernel (mla_decode)"
        elif "grouped" in key or "moe" in key or "histc" in key or "sort" in key or "index" in key or "scatter" in key:
            bucket = "MoE routing / grouped GEMM / gather"
        elif "gemm" in key or "matmul" in key or "cutlass" in key or "sm90" in key or "nvjet" in key or "bmm" in key:
            bucket = "GEMMs (projections, absorb, experts)"
        elif "norm" in key or "rsqrt" in key or "pow" in key or "mean" in key:
            bucket = "norms"
        else:
            bucket = "other elementwise / copies"
        buckets[bucket] = buckets.get(bucket, 0.0) + gpu_us / 1e3
    busy = sum(buckets.values())
    print(f"\nprofile {name} patched-kernel B={batch} L={context}: step {timer.ms:.2f} ms wall, "
          f"{busy:.2f} ms GPU busy ({busy / timer.ms:.0%}); the rest is launch gaps / Python")
    for bucket, ms in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {bucket:40s} {ms:8.2f} ms  {ms / timer.ms:6.1%} of the step")
    top = sorted(prof.key_averages(), key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:8]
    for evt in top:
        print(f"    {(getattr(evt, 'self_device_time_total', 0) or 0) / 1e3:8.2f} ms  x{evt.count:<4d} {evt.key[:90]}")
    return dict(step_ms=timer.ms, gpu_busy_ms=busy, buckets=buckets)


def time_to_first_token(model, batch, prompt, device):
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, prompt), device=device)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        with _Timer(device) as timer:
            model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    return timer.ms


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for (variant, batch) in sorted({(r["variant"], r["batch"]) for r in rows if r["model"] == name}):
            pts = sorted((r["context"], r["ms_per_step"]) for r in rows
                         if r["model"] == name and r["variant"] == variant and r["batch"] == batch)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{variant} B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode ms / step")
        ax.set_title(name)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out")
    parser.add_argument("--models", default="v2-lite,v3-128h")
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stock-max-tokens", type=int, default=32 * 16384,
                        help="skip stock points with batch*context above this (its step re-expands the cache)")
    parser.add_argument("--memory-budget-gib", type=float, default=40.0,
                        help="KV + per-step transient budget for the largest-context estimate")
    parser.add_argument("--variants",
                        default="stock,patched-torch,patched-kernel,patched-kernel-merged,stock-graph,patched-kernel-graph")
    parser.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-token prefills")
    parser.add_argument("--profile", action="store_true", help="profile one patched step per model (B=16, L=16K)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        for spec in MODELS.values():
            spec.update(hidden_size=64, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                        vocab_size=128, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        num_attention_heads=4, q_lora_rank=None if spec["q_lora_rank"] is None else 16)
            if "n_routed_experts" in spec:
                spec.update(n_routed_experts=4, num_experts_per_tok=2)
        args.batches, args.contexts, args.steps = "1,2", "16,64", 2
    os.makedirs(args.out, exist_ok=True)
    rows, skipped, extra = [], [], {}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model = build(name, device)
        print(f"built {name} in {time.perf_counter() - t0:.1f} s, "
              f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params", flush=True)
        if not args.no_ttft:
            extra[f"{name}_ttft_ms"] = {f"B{b}xL{p}": time_to_first_token(model, b, p, device)
                                        for b, p in ((1, 1024), (1, 4096), (8, 1024))}
        if args.profile and device.type == "cuda":
            mla_patch.patch(model, backend="kernel")
            try:
                extra[f"{name}_profile"] = profile_step(model, name, 16, 16384, device)
            except Exception as err:  # the profile is a diagnosis; never lose the benchmark to it
                print(f"profile failed: {type(err).__name__}: {err}")
            mla_patch.unpatch(model)
        for variant in args.variants.split(","):
            mla_patch.unpatch(model)  # one set of weights; patched in place per variant
            if not variant.startswith("stock"):
                mla_patch.patch(model, backend="torch" if variant == "patched-torch" else "kernel",
                                absorb="merged" if variant.endswith("merged") else "per_head")
            for batch in (int(b) for b in args.batches.split(",")):
                for context in (int(c) for c in args.contexts.split(",")):
                    why = _skip_reason(variant, batch, context, args)
                    if why:
                        skipped.append(f"{name} {variant} B={batch} L={context}: {why}")
                        continue
                    try:
                        row = run_point(model, name, variant, batch, context, args.steps, device)
                    except torch.OutOfMemoryError:
                        skipped.append(f"{name} {variant} B={batch} L={context}: out of memory")
                        torch.cuda.empty_cache()
                        continue
                    except Exception as err:  # report and go on: one failing variant must not hide the rest
                        skipped.append(f"{name} {variant} B={batch} L={context}: {type(err).__name__}: {err}"[:300])
                        torch.cuda.empty_cache()
                        continue
                    rows.append(row)
                    print(f"{name:8s} {variant:22s} B={batch:3d} L={context:6d} {row['ms_per_step']:9.2f} ms/step "
                          f"{row['tokens_per_s']:9.1f} tok/s  KV {row['kv_bytes_per_token_per_layer']:7.0f} B/tok/layer "
                          f"step transient {row['step_transient_bytes'] / 2**20:9.1f} MiB"
                          + (f"  graph vs eager rel err {row['graph_vs_eager_rel_err']:.1e}"
                             if row["graph_vs_eager_rel_err"] is not None else ""), flush=True)
        mla_patch.unpatch(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    # Speedups against stock at the same point.
    index = {(r["model"], r["variant"], r["batch"], r["context"]): r for r in rows}
    for r in rows:
        base = index.get((r["model"], "stock", r["batch"], r["context"]))
        r["speedup_vs_stock"] = base["ms_per_step"] / r["ms_per_step"] if base else None
    # Largest context one sequence can decode in a fixed budget: KV bytes plus the step's transient.
    budget = args.memory_budget_gib * 2**30
    largest = {}
    for (name, variant) in sorted({(r["model"], r["variant"]) for r in rows}):
        pts = [r for r in rows if r["model"] == name and r["variant"] == variant]
        big = max(pts, key=lambda r: r["batch"] * r["context"])
        layers = MODELS[name]["num_hidden_layers"]
        per_token = big["kv_bytes_per_token_per_layer"] * layers + big["step_transient_bytes"] / (big["batch"] * big["context"])
        largest[f"{name}/{variant}"] = int(budget / per_token)
    extra["largest_context_in_budget"] = largest
    extra["memory_budget_gib"] = args.memory_budget_gib
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  transformers=__import__("transformers").__version__, rows=rows, skipped=skipped, **extra,
                  note="random bf16 weights; real shapes")
    with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(args.out, "bench_generate.png"))
    print("\n| model | variant | B | L | ms/step | tok/s | x stock | KV B/tok/layer | step transient MiB | graph vs eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{r['speedup_vs_stock']:.1f}" if r["speedup_vs_stock"] else "-"
        print(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {sp} | {r['kv_bytes_per_token_per_layer']:.0f} | "
              f"{r['step_transient_bytes'] / 2**20:.1f} | "
              f"{'-' if r['graph_vs_eager_rel_err'] is None else format(r['graph_vs_eager_rel_err'], '.1e')} |")
    for s in skipped:
        print("skipped:", s)
    print("ttft:", {k: v for k, v in extra.items()})


if __name__ == "__main__":
    main()
