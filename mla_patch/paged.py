"""transformers' continuous batching (generate_batch, `transformers serve`) as the patched layers see it.

Continuous batching packs every request's new tokens into one sequence [1, total_q] and keeps each MLA layer's
latents in a paged pool, one row of kv_lora_rank + rope values per token (`MLACacheAllocator`). Each step it
hands the layers, per request r, the query tokens cu_seq_lens_q[r]:cu_seq_lens_q[r + 1] and the pool rows of its
whole history read_index[cu_seq_lens_k[r]:cu_seq_lens_k[r + 1]] (the new tokens last). Stock attention gathers
those rows and expands them through kv_b_proj every step; here a request with few new tokens (decode) runs
absorbed over its pool rows in place, and one with many (a prefill chunk) the stock computation.

`StepLayout` is what one step's kwargs say, worked out once a step and shared by its layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def has_latent_pages() -> bool:
    """Whether this transformers keeps MLA latents in continuous batching's pages (5.25 on; before, its continuous
    batching does not run MLA models)."""
    try:
        from transformers.generation.continuous_batching.cache_allocators import MLACacheAllocator  # noqa: F401
    except ImportError:
        return False
    return True


def is_paged_cache(cache) -> bool:
    return type(cache).__name__ == "PagedAttentionCache" and hasattr(cache, "layer_to_allocator")


def latent_pools(cache, layer_idx: int):
    """(c_pool [M, R], k_pe_pool [M, P]) strided views of this layer's rows in the paged cache, or None where the
    allocator does not hold latents (not transformers' MLA allocator, or another version of it)."""
    allocator = cache.layer_to_allocator[layer_idx]
    views = getattr(allocator, "_latent_token_views", None)
    if not isinstance(views, dict) or layer_idx not in views:
        return None
    return views[layer_idx]


def write_latents(cache, layer_idx: int, c_new: torch.Tensor, k_pe_new: torch.Tensor, kwargs: dict):
    """Write the step's new latents ([1, 1, total_q, R], [1, 1, total_q, P]) to their pool rows through the cache's
    own update, with an empty read index so nothing is read back; returns the kwargs the update resolved for this
    layer (cu_seq_lens_k for its layer type)."""
    allocator = cache.layer_to_allocator[layer_idx]
    layer_kwargs = dict(kwargs)
    reads = list(kwargs["read_index"])
    reads[allocator.index] = reads[allocator.index][:0]
    layer_kwargs["read_index"] = reads
    cache.update(c_new, k_pe_new, layer_idx, kwargs=layer_kwargs)
    return layer_kwargs


@dataclass
class StepLayout:
    """One step's packed batch, split by request: the decode tokens (run absorbed) and the prefill requests."""

    decode_tokens: torch.Tensor  # [N] long, positions of the decode tokens in the packed batch
    row_table: torch.Tensor  # [N, T] int32, each decode token's history as pool rows (row t of its request)
    kv_end: torch.Tensor  # [N] int32, rows each decode token sees (its request's history up to itself)
    prefill: list  # (q0, q1, k0, k1): query tokens and the span of `rows` holding each prefill request's history
    rows: torch.Tensor  # pool rows of every request's history, request after request


def step_layout(cache, layer_idx: int, kwargs: dict, layer_kwargs: dict, max_decode_tokens: int) -> StepLayout:
    """The layout of this step for the layers of one allocator: worked out at the allocator's first layer (a step
    runs the layers in order) and reused by the others, since the step's buffers may be reused between steps. Reads
    the per-request boundaries on the host: one read a step and allocator."""
    allocator = cache.layer_to_allocator[layer_idx]
    held = cache.__dict__.setdefault("_mla_step_layouts", {})
    if layer_idx != min(allocator.layer_indices) and allocator.index in held:
        return held[allocator.index]
    cu_q, cu_k = kwargs["cu_seq_lens_q"], layer_kwargs["cu_seq_lens_k"]
    read_index = kwargs["read_index"][allocator.index]
    q_bounds, k_bounds = torch.stack((cu_q, cu_k.to(cu_q.dtype))).tolist()  # one host read for both
    if read_index.numel() == 0:  # no request has a cached past: each history is its new tokens, just written
        read_index, k_bounds = kwargs["write_index"][allocator.index], q_bounds
    device = read_index.device
    decode_q, decode_k0, decode_ends, prefill = [], [], [], []
    for r in range(len(q_bounds) - 1):
        q0, q1, k0, k1 = q_bounds[r], q_bounds[r + 1], k_bounds[r], k_bounds[r + 1]
        if q1 <= q0:
            continue
        if q1 - q0 > max_decode_tokens:
            prefill.append((q0, q1, k0, k1))
            continue
        for j in range(q1 - q0):  # token j of the request sees its history up to itself (causal)
            decode_q.append(q0 + j)
            decode_k0.append(k0)
            decode_ends.append(k1 - k0 - (q1 - q0 - 1 - j))
    n = len(decode_q)
    span = max(decode_ends, default=0)
    starts = torch.tensor(decode_k0, dtype=torch.long).to(device, non_blocking=True)
    offsets = torch.arange(span, device=device)
    flat = (starts[:, None] + offsets[None, :]).clamp_(max=max(read_index.numel() - 1, 0))
    row_table = read_index[flat] if read_index.numel() else torch.zeros(n, span, dtype=torch.long, device=device)
    layout = StepLayout(
        decode_tokens=torch.tensor(decode_q, dtype=torch.long).to(device, non_blocking=True),
        row_table=row_table.to(torch.int32),
        kv_end=torch.tensor(decode_ends, dtype=torch.int32).to(device, non_blocking=True),
        prefill=prefill,
        rows=read_index,
    )
    held[allocator.index] = layout
    return layout
