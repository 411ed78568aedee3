"""The speed users get from model.generate(): stock and patched, eager, static-compiled and by default.

    python scripts/bench_generate.py --out out/ [--models v2-lite,v3-128h] [--batches 1,16,64]
                                     [--contexts 2048,8192,32768] [--variants ...] [--smoke]

Models are built from configs with RANDOM bf16 weights (real shapes; decode speed depends on shapes):
  v2-lite : DeepSeek-V2-Lite (hidden 2048, 27 layers, 16 heads, kv_lora 512, no q_lora, 64 routed
            experts top-6 + 2 shared, first layer dense).
  v3-128h : a DeepSeek-V3-shaped 128-head attention stack (hidden 7168, q_lora 1536, kv_lora 512), 4 layers
            with a small dense MLP.
Variants, each through model.generate() itself:
  stock           transformers as is (its DynamicCache of latents, re-expanded through kv_b_proj every step)
  stock-static    transformers with a StaticCache, which transformers compiles (torch.compile, reduce-overhead)
  patched         mla_patch.patch(), generate(..., disable_compile=True): absorbed decode, eager
  patched-static  mla_patch.patch() with a StaticCache: transformers compiles our absorbed decode
  patched-graphs  mla_patch.patch(), plain generate(): the default (decode steps replayed from CUDA graphs)
Contexts up to 32K would cost minutes of prefill per point, so each generate() gets a cache already holding
L - 1 random latent rows (the same for every variant) and a prompt of L tokens: generate() runs the last prompt
token as its prefill, then decodes. Decode ms/step = (t(N new tokens) - t(1 new token)) / (N - 1), which takes
out the prefill and generate()'s set-up; warmup_s is the first call's extra time (capture or compile). Time to
first token comes from a real prefill at the small points (--ttft-max-tokens). The floor of a step is the bytes
it must read (weights it touches, the latent cache) over the copy bandwidth measured in the same run.
Writes generate.json (docs/results/generate.json is the latest GPU run) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
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
VARIANTS = ("stock", "stock-static", "patched", "patched-static", "patched-graphs")


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


# -- one point: a cache holding L - 1 rows, a prompt of L tokens, two generate() lengths ----------------


def _latents(model, batch, rows, device):
    """The same random latent rows for every variant of a point: [(c_kv, k_pe)] per layer."""
    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(rows * 131 + batch)
    return [(torch.randn(batch, 1, rows, cfg.kv_lora_rank, device=device, dtype=model.dtype, generator=gen),
             torch.randn(batch, 1, rows, cfg.qk_rope_head_dim, device=device, dtype=model.dtype, generator=gen))
            for _ in range(cfg.num_hidden_layers)]


def _filled_cache(variant, model, latents, capacity):
    from transformers import DynamicCache, StaticCache

    if variant.endswith("static"):
        cache = StaticCache(config=model.config, max_cache_len=capacity)
    elif variant == "stock":
        cache = DynamicCache(config=model.config)
    else:
        cache = mla_patch.LatentCache(config=model.config, initial_capacity=capacity)
    for layer_idx, (c, k) in enumerate(latents):
        cache.update(c, k, layer_idx)
    return cache


def _rewind_to(cache, rows):
    """Back to `rows` cached tokens after a generate() call (StaticLayer has no crop() in transformers 5.17)."""
    for layer in cache.layers:
        length = getattr(layer, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            length.fill_(rows)
        elif hasattr(layer, "crop"):
            layer.crop(rows)
        else:
            raise RuntimeError(f"cannot rewind a {type(layer).__name__}")


def _generate(model, variant, cache, ids, new_tokens):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    if variant == "patched":
        kwargs["disable_compile"] = True
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: cache}, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_point(model, name, variant, batch, context, steps, latents):
    device = latents[0][0].device
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, context), device=device,
                        generator=torch.Generator(device=device).manual_seed(context))
    capacity = context + steps + 8
    torch.cuda.empty_cache()
    cache = _filled_cache(variant, model, latents, capacity)
    rows = context - 1
    first, _ = _generate(model, variant, cache, ids, steps)  # warm-up: capture / compile / autotune
    _rewind_to(cache, rows)
    torch.cuda.reset_peak_memory_stats()
    long_times, short_times, out = [], [], None
    for _ in range(2):
        t, out = _generate(model, variant, cache, ids, steps)
        long_times.append(t)
        _rewind_to(cache, rows)
        t, _ = _generate(model, variant, cache, ids, 1)
        short_times.append(t)
        _rewind_to(cache, rows)
    peak = torch.cuda.max_memory_allocated() / 2**30
    ms = (min(long_times) - min(short_times)) / (steps - 1) * 1e3
    # Step 0 ran in generate()'s prefill call (eager in every variant); step 1 is the decode loop's first step.
    logits = torch.stack([out.logits[0], out.logits[1]]).float().cpu()
    del cache
    gc.collect()
    return dict(model=name, variant=variant, batch=batch, context=context, ms_per_step=ms,
                decode_tok_s=batch * 1e3 / ms, warmup_s=max(0.0, first - min(long_times)), peak_gib=peak,
                new_tokens=steps), logits, out.sequences[:, context:].cpu()


def time_to_first_token(model, batch, prompt):
    """A real prefill of `prompt` tokens through generate(max_new_tokens=1) (the stock computation)."""
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, prompt), device=model.device)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


# -- the floor: bytes a step must read over the copy bandwidth ---------------------------------------------


def copy_bandwidth_gbs(device) -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy (median of 10)."""
    src = torch.empty(2**31, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times[2:])[len(times[2:]) // 2]
    del src, dst
    return 2 * 2**32 / (ms * 1e-3) / 1e9


def step_bytes(model, batch, context) -> float:
    """Weights a step touches (routed experts: those the batch's tokens pick, expected for uniform routing;
    the embedding: one row a token) plus the latent cache it reads."""
    cfg = model.config
    total = 0
    routed = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if "embed_tokens" in name:
            total += batch * p.shape[1] * p.element_size()
        elif ".mlp.experts." in name:
            routed += nbytes
        else:
            total += nbytes
    experts = getattr(cfg, "n_routed_experts", 0) or 0
    if experts and routed:
        picked = experts * (1 - (1 - cfg.num_experts_per_tok / experts) ** batch)
        total += routed * picked / experts
    cache = cfg.num_hidden_layers * batch * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.dtype.itemsize
    return total + cache


def _rel(a, b):
    a, b = a.double(), b.double()
    return float("inf") if torch.isnan(a).any() else ((a - b).norm() / b.norm()).item()


def write_results(out, bandwidth, rows, ttft, skipped) -> None:
    """generate.json with each row's speedups against stock at the same point (rewritten after every row)."""
    index = {(r["model"], r["variant"], r["batch"], r["context"]): r for r in rows}
    for r in rows:
        for base in ("stock", "stock-static"):
            other = index.get((r["model"], base, r["batch"], r["context"]))
            r[f"x_{base}"] = other["ms_per_step"] / r["ms_per_step"] if other else None
    result = dict(gpu=torch.cuda.get_device_name(), commit=_commit(), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, transformers=__import__("transformers").__version__,
                  copy_bandwidth_gbs=bandwidth, rows=rows, ttft_ms=ttft, skipped=skipped,
                  note="random bf16 weights, real shapes; decode ms from two generate() lengths")
    with open(os.path.join(out, "generate.json"), "w") as f:
        json.dump(result, f, indent=1)


def _commit() -> str:
    if os.environ.get("MLA_PATCH_COMMIT"):  # the device copy of the tree has no .git
        return os.environ["MLA_PATCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out")
    parser.add_argument("--models", default="v2-lite,v3-128h")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--static-points", default="1x2048,16x8192",
                        help="BxL points of the static variants (each shape is a compile of minutes)")
    parser.add_argument("--steps", type=int, default=33, help="new tokens of the long generate() call")
    parser.add_argument("--max-cached-gib", type=float, default=40.0,
                        help="skip points whose latent cache alone is larger (stock holds it twice while it grows)")
    parser.add_argument("--stock-max-tokens", type=int, default=16 * 32768,
                        help="skip stock points above this many cached tokens (its step re-expands them all)")
    parser.add_argument("--ttft-max-tokens", type=int, default=32768, help="real prefills up to B x L tokens")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, not speed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate needs a CUDA device (generate()'s default path differs on CPU)")
    device = torch.device("cuda")
    if args.smoke:
        for spec in MODELS.values():
            spec.update(hidden_size=256, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=64,
                        vocab_size=512, num_attention_heads=4, q_lora_rank=None if spec["q_lora_rank"] is None else 64)
            if "n_routed_experts" in spec:
                spec.update(n_routed_experts=8, num_experts_per_tok=2)
        args.batches, args.contexts, args.steps, args.static_points = "1,4", "64,300", 5, "1x64"
    os.makedirs(args.out, exist_ok=True)
    bandwidth = copy_bandwidth_gbs(device)
    print(f"copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    static_points = {tuple(int(v) for v in p.split("x")) for p in args.static_points.split(",") if p}
    rows, skipped, ttft = [], [], {}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model = build(name, device)
        print(f"built {name} in {time.perf_counter() - t0:.1f} s, "
              f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params", flush=True)
        for batch in (int(b) for b in args.batches.split(",")):
            for context in (int(c) for c in args.contexts.split(",")):
                cached_gib = step_bytes(model, batch, context) / 2**30 - step_bytes(model, batch, 0) / 2**30
                if cached_gib > args.max_cached_gib:
                    skipped.append(f"{name} B={batch} L={context}: latent cache {cached_gib:.0f} GiB > --max-cached-gib")
                    continue
                if batch * context <= args.ttft_max_tokens:
                    mla_patch.patch(model)
                    ttft[f"{name} B={batch} L={context}"] = time_to_first_token(model, batch, context)
                    mla_patch.unpatch(model)
                latents = _latents(model, batch, context - 1, device)
                logits, tokens = {}, {}
                for variant in args.variants.split(","):
                    why = None
                    if variant.endswith("static") and (batch, context) not in static_points:
                        why = "static variants only at --static-points (a compile per shape)"
                    elif variant == "stock" and batch * context > args.stock_max_tokens:
                        why = "over --stock-max-tokens (its step re-expands the whole cache)"
                    if why:
                        skipped.append(f"{name} {variant} B={batch} L={context}: {why}")
                        continue
                    mla_patch.unpatch(model)
                    if variant.startswith("patched"):
                        mla_patch.patch(model)
                    torch._dynamo.reset()
                    model.__dict__.pop("_compiled_call", None)
                    try:
                        row, logits[variant], tokens[variant] = run_point(model, name, variant, batch, context,
                                                                           args.steps, latents)
                    except Exception as err:  # report and go on: one failing variant must not hide the rest
                        skipped.append(f"{name} {variant} B={batch} L={context}: {type(err).__name__}: {err}"[:300])
                        torch.cuda.empty_cache()
                        continue
                    # A read stream moves bytes at about the copy's read + write rate (HBM's total throughput).
                    floor = step_bytes(model, batch, context) / (bandwidth * 1e9) * 1e3
                    row["floor_ms"] = floor
                    if variant == "patched-graphs":  # which experts implementation the capture kept, and why
                        held = list(mla_patch.graphs.graphs_of(model).captured.values())
                        row["graph_experts_ms"] = held[-1].experts_ms if held else None
                    row["step_gb"] = step_bytes(model, batch, context) / 1e9
                    if "stock" in logits:
                        # Step 1's input is step 0's greedy token: compared only where every row picked stock's.
                        same_input = torch.equal(tokens[variant][:, 0], tokens["stock"][:, 0])
                        row["logits_rel_err_vs_stock"] = [_rel(logits[variant][0], logits["stock"][0]),
                                                          _rel(logits[variant][1], logits["stock"][1]) if same_input else None]
                        row["tokens_equal_stock"] = float((tokens[variant] == tokens["stock"]).float().mean())
                    rows.append(row)
                    write_results(args.out, bandwidth, rows, ttft, skipped)
                    print(f"{name:8s} {variant:15s} B={batch:3d} L={context:6d} {row['ms_per_step']:8.2f} ms/step "
                          f"{row['decode_tok_s']:9.1f} tok/s  warm-up {row['warmup_s']:6.1f} s  peak {row['peak_gib']:6.1f} GiB"
                          f"  floor {floor:6.2f} ms"
                          + (f"  logits vs stock {row['logits_rel_err_vs_stock']}" if "logits_rel_err_vs_stock" in row else ""),
                          flush=True)
                mla_patch.unpatch(model)
                del latents
                gc.collect()
        del model
        gc.collect()
        torch.cuda.empty_cache()

    write_results(args.out, bandwidth, rows, ttft, skipped)
    print("\n| model | variant | B | L | ms/step | tok/s | x stock | x stock-static | floor ms | warm-up s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def fmt(v, spec=".2f"):
            return "-" if v is None else format(v, spec)
        print(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.2f} | "
              f"{r['decode_tok_s']:.0f} | {fmt(r['x_stock'])} | {fmt(r['x_stock-static'])} | {r['floor_ms']:.2f} | "
              f"{r['warmup_s']:.1f} | {r['peak_gib']:.1f} |")
    for s in skipped:
        print("skipped:", s)
    print("ttft ms:", {k: round(v, 1) for k, v in ttft.items()})


if __name__ == "__main__":
    main()
