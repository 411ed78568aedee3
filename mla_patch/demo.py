"""The main job: generate() on the embedded default model, stock and patched, side by side.

    python -m mla_patch.demo [--device cuda] [--dtype bfloat16] [--max-new-tokens 64] [--model PATH]

Prints the generated text, decode tokens/s of each, the KV-cache bytes each kept and the parity:
the patched model's decode steps, teacher-forced on stock's tokens, against stock's step logits.
Then the same comparison at a DeepSeek-V3-like attention shape (demo_shape.py), where the tiny model's
size hides what absorption saves: decode tokens/s, bytes a step allocates, cache bytes per token.
In float32/64 those must agree to 1e-4 and the greedy tokens must be identical. In bf16/fp16 a
near-tie can flip a greedy token in either model, so the bar is the dtype's own error instead: the
patched logits may differ from stock by at most twice stock's own difference from float32.
Exit status 1 if the parity fails.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mla_patch
from mla_patch.cache import CACHE_KWARG
from mla_patch.default_model import DEMO_PROMPTS, load_default_model
from mla_patch.demo_shape import cache_bytes, print_comparison


def _timed_generate(model, inputs, max_new_tokens):
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    model.generate(**inputs, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def teacher_forced_logits(model, inputs, sequences, cache):
    """Step logits [B, steps, V] of `model` fed `sequences`' new tokens one decode step at a time."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    steps = sequences.shape[1] - ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{CACHE_KWARG: cache})
        logits = [out.logits[:, -1].float()]
        for t in range(ids.shape[1], ids.shape[1] + steps - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=sequences[:, t : t + 1], attention_mask=mask, position_ids=positions, use_cache=True,
                        **{CACHE_KWARG: cache})
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float("inf") if torch.isnan(a).any() else ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _parity(stock, patched, inputs, want) -> tuple[bool, str]:
    """Patched decode steps teacher-forced on stock's greedy tokens against stock's own step logits."""
    from transformers import DynamicCache

    stock_logits = torch.stack(want.logits, dim=1).float()
    got = teacher_forced_logits(patched, inputs, want.sequences, mla_patch.LatentCache(config=patched.config))
    err = _rel(got, stock_logits)
    if stock.dtype in (torch.float32, torch.float64):
        return err < 1e-4, f"patched vs stock step logits (teacher-forced): rel err {err:.2e} (bar 1e-4)"
    full = copy.deepcopy(stock).float()  # the dtype's own error: stock against its float32 self
    exact = teacher_forced_logits(full, inputs, want.sequences, DynamicCache(config=full.config))
    own = _rel(stock_logits, exact)
    bar = 2 * own + 1e-4
    return err <= bar, (f"patched vs stock step logits (teacher-forced): rel err {err:.2e}; stock {stock.dtype} vs "
                        f"float32 {own:.2e} (bar {bar:.2e})")


def _output_cache(out):
    # generate() names it `cache` from transformers 5.20 (`past_key_values` deprecated), before that only the latter.
    return out["cache"] if "cache" in out.keys() else out.get("past_key_values")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local checkpoint dir (default: the embedded model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--backend", default="auto", choices=["auto", "kernel", "torch"])
    parser.add_argument("--no-shape", action="store_true", help="skip the comparison at a DeepSeek-V3-like shape")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible here (torch {torch.__version__}, "
                     f"CUDA build: {torch.version.cuda or 'no'}); run with --device cpu")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    stock, tokenizer = load_default_model(dtype=dtype, device=args.device, path=args.model)
    patched = copy.deepcopy(stock)
    report = mla_patch.patch(patched, backend=args.backend)
    if report["patched_layers"] == 0:
        print(f"{args.model}: {type(stock).__name__} ({stock.config.model_type}) has no MLA attention layer of a "
              f"family mla_patch serves, so there is nothing to compare; served: {', '.join(mla_patch.families.FAMILIES)}")
        return 2
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(DEMO_PROMPTS, return_tensors="pt", padding=True).to(args.device)
    batch = inputs["input_ids"].shape[0]

    results = {}
    for name, model in (("stock", stock), ("patched", patched)):
        out, seconds = _timed_generate(model, inputs, args.max_new_tokens)
        results[name] = (out, seconds)

    want, got = results["stock"][0], results["patched"][0]
    prompt_len = inputs["input_ids"].shape[1]
    for row in range(batch):
        text = tokenizer.decode(got.sequences[row, prompt_len:], skip_special_tokens=True)
        print(f"[{row}] {DEMO_PROMPTS[row][-60:]!r}\n    -> {text!r}")
    same = torch.equal(want.sequences, got.sequences)
    differ = (want.sequences[:, prompt_len:] != got.sequences[:, prompt_len:]).any(dim=0).nonzero()
    ok, parity = _parity(stock, patched, inputs, want)
    if stock.dtype in (torch.float32, torch.float64):
        ok = ok and same
    print()
    print(f"model: {args.model or 'embedded mla-tiny'}  device: {args.device}  dtype: {dtype}  batch: {batch}")
    print(f"decode backend: {mla_patch.status()['decode_backend']}")
    for name, (out, seconds) in results.items():
        tokens = batch * args.max_new_tokens
        cache = _output_cache(out)
        allocated, used = cache_bytes(cache)
        print(f"{name:>8}: {tokens / seconds:9.1f} tokens/s  ({seconds * 1e3:.1f} ms for {args.max_new_tokens} steps)"
              f"  KV cache {type(cache).__name__}: {used / 1024:.1f} KiB of tokens, {allocated / 1024:.1f} KiB allocated")
    print(f"greedy tokens identical: {same}" + ("" if same else f" (first difference at step {differ[0].item()})"))
    print(parity)
    print(f"parity: {'PASS' if ok else 'FAIL'}")
    if not args.no_shape:
        print_comparison(args.device, getattr(torch, dtype))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
