"""Pure-PyTorch absorbed MLA decode: the reference, the test oracle and the CPU fallback.

It takes the same arguments as the CUDA kernel (`mla_patch.ops.mla_decode`) and keeps its math
order: latent scores plus rope scores, scale, subtract the row max, exponentiate, normalize,
weighted sum of `c_kv`. It favours being obvious over being fast.
"""

from __future__ import annotations

import torch


def mla_decode_ref(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    return_probs: bool = False,
    row_index: torch.Tensor | None = None,
):
    """Attention of S new query tokens per sequence over a latent cache (one shared KV head).

    Args:
        q_latent: [B, S, H, R] query already multiplied by W_UK (R = kv_lora_rank).
        q_pe:     [B, S, H, P] roped query part (P = qk_rope_head_dim).
        c_kv:     [B, T, R] normalized latent cache rows (T = capacity; only a range is valid).
        k_pe:     [B, T, P] roped shared key rows.
        kv_start: [B] int, first valid cache row of each sequence (left padding before it).
        kv_end:   [B] int, one past the last row visible to the LAST new token. New token s of S
                  sees rows [kv_start, kv_end - (S - 1 - s)): causal among the new tokens.
                  Ranges are clamped to the T rows there are (a start below 0 reads from row 0, an
                  end past T stops at T); a range left empty (start >= end, or T = 0) gives a zero
                  output and lse -inf. The CUDA kernel keeps the same contract.
        sm_scale: softmax scale of the un-absorbed head dim (the module's own `scaling`); finite.
        return_probs: also return the probabilities [B, H, S, T] (for output_attentions).
        row_index: [B, T] int, for a paged cache: c_kv [M, R] and k_pe [M, P] are then pools of rows and
                  sequence b's row t is pool row row_index[b, t] (a page table at one-row pages, as
                  transformers' continuous batching indexes its latent cache). Indices outside [0, M) are
                  clamped; those outside a sequence's range are never read.

    Returns:
        out_latent [B, S, H, R] in q_latent's dtype, lse [B, S, H] float32 (natural log; -inf
        where a query sees no row, whose output is then zero); with return_probs, a third tensor.
    """
    if row_index is not None:
        c_kv, k_pe = gather_rows(c_kv, k_pe, row_index)
    B, S, H, R = q_latent.shape
    T = c_kv.shape[1]
    # Accumulate in float32 at least; float64 inputs stay float64 (the test oracle).
    acc = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    if T == 0:  # no rows: every range is empty
        lse = torch.full((B, S, H), float("-inf"), dtype=acc, device=q_latent.device)
        out = torch.zeros_like(q_latent)
        return (out, lse, torch.zeros(B, H, S, 0, dtype=acc, device=q_latent.device)) if return_probs else (out, lse)
    ql, qp = q_latent.to(acc), q_pe.to(acc)
    ck, kp = c_kv.to(acc), k_pe.to(acc)

    scores = torch.einsum("bshr,btr->bsht", ql, ck) + torch.einsum("bshp,btp->bsht", qp, kp)
    scores = scores * sm_scale

    rows = torch.arange(T, device=c_kv.device)
    ends = kv_end.to(c_kv.device).long()[:, None] - (S - 1) + torch.arange(S, device=c_kv.device)  # [B, S]
    starts = kv_start.to(c_kv.device).long()[:, None, None]
    visible = (rows[None, None, :] >= starts) & (rows[None, None, :] < ends[:, :, None])  # [B, S, T]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    # Rows outside every range may hold anything (stale or NaN): keep them out of the product too.
    ck = torch.where(visible.any(dim=1)[:, :, None], ck, torch.zeros((), dtype=acc, device=ck.device))

    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / denom.clamp_min(torch.finfo(acc).tiny)
    out = torch.einsum("bsht,btr->bshr", probs, ck)
    lse = (row_max + torch.log(denom)).squeeze(-1).to(torch.float32 if acc == torch.float32 else acc)
    if return_probs:
        return out.to(q_latent.dtype), lse, probs.permute(0, 2, 1, 3)
    return out.to(q_latent.dtype), lse


def gather_rows(c_pool: torch.Tensor, k_pool: torch.Tensor, row_index: torch.Tensor):
    """Dense [B, T, R] and [B, T, P] copies of the pool rows a paged cache's row_index [B, T] names (clamped)."""
    if c_pool.shape[0] == 0:
        B, T = row_index.shape
        return c_pool.new_zeros(B, T, c_pool.shape[-1]), k_pool.new_zeros(B, T, k_pool.shape[-1])
    index = row_index.to(device=c_pool.device, dtype=torch.long).clamp(0, c_pool.shape[0] - 1)
    return c_pool[index], k_pool[index]
