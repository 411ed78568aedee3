"""Valid cache rows per sequence, from the attention mask transformers builds: what the decode op reads.

The absorbed decode op takes one range [kv_start, kv_end) per sequence (left padding before it, causal
among the new tokens). transformers hands each layer a 2-D padding mask (flash attention) or a 4-D bool
or additive mask; `masked_ranges` turns either into the ranges, or None when a row is not one contiguous
range (the caller then runs the stock attention, which takes any mask).
"""

from __future__ import annotations

import weakref

import torch



def _allowed_rows(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Bool [B, S, KV]: which cache rows each new token may attend, from a 2-D or 4-D mask."""
    if attention_mask.dim() == 2:  # flash-attention style padding mask [B, KV]; causality implied
        kv = attention_mask.shape[-1]
        padding = attention_mask.bool()[:, None, :]
        rows = torch.arange(kv, device=attention_mask.device)
        last = kv - num_new + torch.arange(num_new, device=attention_mask.device)
        return padding & (rows[None, None, :] <= last[None, :, None])
    mask = attention_mask[:, 0]  # [B, S, KV]; one mask for all heads
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 where allowed


def _ranges_from_allowed(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kv_start [B], kv_end [B] of the last new token's row, and whether every row is such a range."""
    kv = allowed.shape[-1]
    rows = torch.arange(kv, device=allowed.device)
    starts = torch.where(allowed, rows, kv).amin(dim=-1)  # [B, S]
    ends = torch.where(allowed, rows + 1, 0).amax(dim=-1)  # [B, S]
    counts = allowed.sum(dim=-1)
    num_new = allowed.shape[1]
    last_end = ends[:, -1:]
    expected_ends = last_end - (num_new - 1) + torch.arange(num_new, device=allowed.device)
    nonempty = counts > 0
    first_start = starts[:, -1:]
    expected_counts = (expected_ends - first_start).clamp_min(0)
    # Every row is [kv_start, kv_end - (S-1-s)), contiguous, as the kernel assumes.
    ok = (counts == expected_counts) & (~nonempty | ((starts == first_start) & (ends == expected_ends)))
    kv_start = torch.minimum(first_start, last_end).squeeze(-1)
    return kv_start.to(torch.int32), last_end.squeeze(-1).to(torch.int32), ok.all()


_range_memo: tuple | None = None  # (weakref to mask, key, result): all layers of a step share it


def unmasked_ranges(batch: int, kv_end, device) -> tuple[torch.Tensor, torch.Tensor]:
    """No mask: every sequence sees rows [0, kv_end) (kv_end an int or a 0-d tensor)."""
    kv_start = torch.zeros(batch, dtype=torch.int32, device=device)
    if isinstance(kv_end, torch.Tensor):
        return kv_start, kv_end.to(device=device, dtype=torch.int32).expand(batch)
    return kv_start, torch.full((batch,), kv_end, dtype=torch.int32, device=device)


def masked_ranges(attention_mask: torch.Tensor, num_new: int):
    """(kv_start, kv_end) int32 [B] from a mask, or None when the mask is not a per-row range."""
    global _range_memo
    if torch.compiler.is_compiling():  # traced: no host values (data_ptr, the check's sync) in the graph
        kv_start, kv_end, _ = _ranges_from_allowed(_allowed_rows(attention_mask, num_new))
        return kv_start, kv_end
    key = (num_new, attention_mask.data_ptr(), tuple(attention_mask.shape), attention_mask._version)
    if _range_memo is not None and _range_memo[0]() is attention_mask and _range_memo[1] == key:
        return _range_memo[2]
    kv_start, kv_end, ok = _ranges_from_allowed(_allowed_rows(attention_mask, num_new))
    result = (kv_start, kv_end)
    capturing = attention_mask.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and not bool(ok):
        # One host sync per step (memoized across layers): a mask with holes would be silently
        # misread by a range-based kernel, so check it when we can afford to (not inside a graph).
        result = None
    # Memoized under graph capture too: the ranges are tensors of the graph's pool, and recomputing
    # them in every layer added ~15 small kernels a layer to the captured step.
    _range_memo = (weakref.ref(attention_mask), key, result)
    return result
