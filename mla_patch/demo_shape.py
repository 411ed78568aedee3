"""The demo's second half: stock and patched at a DeepSeek-V3-like attention shape, where it matters.

The embedded model is tiny (4 heads, kv_lora_rank 32) so its parity check runs anywhere; at that size
absorption saves nothing. Here: 2 layers of DeepSeek-V3's attention (hidden 1024, 16 heads, kv_lora_rank
512, rope 64, q_lora 384) with random weights, a 2K-token prompt, and generate() as users call it, both
models on the same weights. Printed per model: decode tokens/s (from two generate() lengths, so prefill
and set-up cancel), the bytes one decode step allocates (stock re-expands the whole cache through
kv_b_proj every step; patched reads the latents in place), and the cache bytes per token and layer.
"""

from __future__ import annotations

import copy
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mla_patch
from mla_patch.cache import CACHE_KWARG, capacity_for

SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=512,
             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=2, intermediate_size=2048,
             first_k_dense_replace=2, vocab_size=1024, max_position_embeddings=8192)


def build_shape_model(device, dtype):
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(**SHAPE)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


class _CountAllocations(TorchDispatchMode):
    """Bytes of every tensor the ops inside the block return (what one step allocates, transient or not)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new memory, not a view
                inputs.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


def _decode_rate(model, ids, cache, steps: int) -> float:
    """Decode tokens/s of generate(): (t(steps new tokens) - t(1 new token)) / (steps - 1), best of two.

    Each call starts from a copy of `cache` holding all but the last prompt token, so generate()'s own
    prefill is one token and the prompt's prefill time (noisy next to a few decode steps) stays out."""
    with torch.no_grad():
        model(input_ids=ids[:, :-1], **{CACHE_KWARG: cache}, use_cache=True)

    def timed(new_tokens):
        fresh = copy.deepcopy(cache)
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: fresh},
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up (and, on CUDA, the patched model's graph capture)
    long, short = min(timed(steps) for _ in range(2)), min(timed(1) for _ in range(2))
    return ids.shape[0] * (steps - 1) / max(long - short, 1e-9)


def _step_allocations(model, ids, cache) -> int:
    """Bytes one decode step allocates over a cache holding the prompt (sized as generate() sizes it)."""
    with torch.no_grad():
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True)
        with _CountAllocations() as counter:
            model(input_ids=ids[:, -1:], **{CACHE_KWARG: cache}, use_cache=True)
    return counter.bytes


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes allocated, bytes holding cached tokens) over all layers."""
    allocated = used = 0
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "buffer", None) is not None:  # LatentCache: preallocated, grown x2
            allocated += layer.nbytes()
            used += layer.nbytes() * layer.get_seq_length() // max(layer.capacity, 1)
        else:
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor):
                    allocated += t.numel() * t.element_size()
                    used += t.numel() * t.element_size()
    return allocated, used


def _bytes_per_cached_token(cache, tokens: int) -> float:
    """Cache bytes per token and layer that the cache keeps (its rows, not its spare capacity)."""
    return cache_bytes(cache)[1] / (tokens * len(cache.layers))


def compare_at_shape(device: str, dtype: torch.dtype, prompt: int = 2048, steps: int = 12) -> dict:
    """{"stock": {...}, "patched": {...}}: decode tok/s, bytes a step allocates, cache bytes per token/layer."""
    from transformers import DynamicCache

    stock = build_shape_model(device, dtype)
    patched = copy.deepcopy(stock)
    mla_patch.patch(patched)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for name, model, make_cache in (("stock", stock, lambda: DynamicCache(config=stock.config)),
                                    ("patched", patched, lambda: mla_patch.LatentCache(
                                        config=patched.config, initial_capacity=capacity_for(prompt + 1)))):
        cache = make_cache()
        results[name] = {
            "decode_tok_s": _decode_rate(model, ids, make_cache(), steps),
            "step_alloc_bytes": _step_allocations(model, ids, cache),
            "cache_bytes_per_token_layer": _bytes_per_cached_token(cache, prompt + 1),
        }
    return results


def print_comparison(device: str, dtype: torch.dtype) -> None:
    results = compare_at_shape(device, dtype)
    print(f"\nat a DeepSeek-V3-like attention shape (2 layers, hidden 1024, 16 heads, kv_lora_rank 512, random "
          f"weights), 2K-token prompt, {device}, {str(dtype).replace('torch.', '')}:")
    for name, r in results.items():
        print(f"{name:>8}: {r['decode_tok_s']:9.1f} decode tokens/s   a decode step allocates "
              f"{r['step_alloc_bytes'] / 2**20:8.2f} MiB   cache {r['cache_bytes_per_token_layer']:6.0f} B per token and layer")
    ratio = results["patched"]["decode_tok_s"] / results["stock"]["decode_tok_s"]
    print(f"patched decodes {ratio:.1f}x as fast as stock here")
