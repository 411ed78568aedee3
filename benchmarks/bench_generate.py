"""The speed users get from model.generate(): stock and patched, eager, static-compiled and by default.

    python benchmarks/bench_generate.py --out out/ [--models v2-lite,v3-128h] [--batches 1,16,64]
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
import sys
import time

import torch

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import mla_patch
from benchmarks.models import build, layer_devices, shrink
from benchmarks.provenance import commit
from benchmarks.timing import copy_bandwidth_gbs, sync, wall_s
from mla_patch import CACHE_KWARG

VARIANTS = ("stock", "stock-static", "patched", "patched-static", "patched-graphs")


# -- one point: a cache holding L - 1 rows, a prompt of L tokens, two generate() lengths ----------------


def random_latents(model, batch, rows):
    """The same random latent rows for every variant of a point: [(c_kv, k_pe)] per layer, on its layer's
    device."""
    cfg = model.config
    devices = layer_devices(model)
    gen = torch.Generator(device=devices[0]).manual_seed(rows * 131 + batch)

    def rows_of(dim):
        return torch.randn(batch, 1, rows, dim, device=devices[0], dtype=model.dtype, generator=gen)

    return [(rows_of(cfg.kv_lora_rank).to(d), rows_of(cfg.qk_rope_head_dim).to(d)) for d in devices]


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
            extra = layer.get_seq_length() - rows
            if extra > 0:
                layer.crop(-extra)  # a count to remove: later transformers refuse crop(target length)
        else:
            raise RuntimeError(f"cannot rewind a {type(layer).__name__}")


def _generate(model, variant, cache, ids, new_tokens):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    if variant == "patched":
        kwargs["disable_compile"] = True
    devices = sorted({d for d in layer_devices(model) if d.type == "cuda"}, key=str)  # a split model: each GPU
    sync(*devices)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: cache}, **kwargs)
    sync(*devices)
    return time.perf_counter() - start, out


def run_point(model, name, variant, batch, context, steps, latents):
    """One variant at one point: ms per decode step from generate() calls of `steps` and of 1 new tokens on a
    cache holding `latents`. Returns the row, the first two steps' logits and the generated tokens."""
    device = latents[0][0].device
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, context), device=device,
                        generator=torch.Generator(device=device).manual_seed(context))
    capacity = context + steps + 8
    cuda = torch.cuda.is_available()  # --smoke runs of bench_multi_gpu run on the CPU
    torch.cuda.empty_cache()
    cache = _filled_cache(variant, model, latents, capacity)
    rows = context - 1
    first, _ = _generate(model, variant, cache, ids, steps)  # warm-up: capture / compile / autotune
    _rewind_to(cache, rows)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    long_times, short_times, out = [], [], None
    for _ in range(2):
        t, out = _generate(model, variant, cache, ids, steps)
        long_times.append(t)
        _rewind_to(cache, rows)
        t, _ = _generate(model, variant, cache, ids, 1)
        short_times.append(t)
        _rewind_to(cache, rows)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    ms = (min(long_times) - min(short_times)) / (steps - 1) * 1e3
    # Step 0 ran in generate()'s prefill call (eager in every variant); step 1 is the decode loop's first step.
    logits = torch.stack([out.logits[0], out.logits[1]]).float().cpu()
    del cache
    gc.collect()
    return dict(model=name, variant=variant, batch=batch, context=context, ms_per_step=ms,
                decode_tok_s=batch * 1e3 / ms, warmup_s=max(0.0, first - min(long_times)), peak_gib=peak,
                new_tokens=steps), logits, out.sequences[:, context:].cpu()


def time_to_first_token(model, batch, prompt):
    """A real prefill of `prompt` tokens through generate(max_new_tokens=1) (the stock computation), in ms."""
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, prompt), device=model.device)
    with torch.no_grad():
        return wall_s(lambda: model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0),
                      repeats=1) * 1e3


# -- the floor: bytes a step must read over the copy bandwidth (timing.copy_bandwidth_gbs) ---------------


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
    result = dict(gpu=torch.cuda.get_device_name(), commit=commit(), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, transformers=__import__("transformers").__version__,
                  copy_bandwidth_gbs=bandwidth, rows=rows, ttft_ms=ttft, skipped=skipped,
                  note="random bf16 weights, real shapes; decode ms from two generate() lengths")
    with open(os.path.join(out, "generate.json"), "w") as f:
        json.dump(result, f, indent=1)


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
        shrink(q_lora_rank=64, n_routed_experts=8, hidden_size=256, num_hidden_layers=2, intermediate_size=128,
               moe_intermediate_size=64, vocab_size=512, num_attention_heads=4)
        args.batches, args.contexts, args.steps, args.static_points = "1,4", "64,300", 5, "1x64"
    os.makedirs(args.out, exist_ok=True)
    bandwidth = copy_bandwidth_gbs()
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
                latents = random_latents(model, batch, context - 1)
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
                    except Exception as err:  # noqa: BLE001 (one failing variant must not hide the rest)
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
