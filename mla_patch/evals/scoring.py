"""Teacher-forced scoring of token sequences, by one prefill forward or through the decode path.

Decode scoring prefills the first `prefill_len` columns (vanilla attention), then feeds the remaining
tokens `decode_step` at a time with the returned cache, so every later logit comes out of a decode
forward: with `mla_patch` applied, the absorbed path over the latent cache. Both functions take the
same left-padded batch and return log-probabilities of the same shape, so any difference between
them is the attention path, nothing else.
"""

from __future__ import annotations

import torch

DEFAULT_PREFILL_LEN = 16
DEFAULT_DECODE_STEP = 1
# Tokens (batch rows x columns) fed through decode forwards, to check against mla_patch.decode_stats();
# "short_first_chunk": first-chunk tokens of chunks short enough for the patch to run them absorbed too
# (an empty cache and at most mla_patch.DECODE_MAX_NEW_TOKENS new tokens).
STATS = {"decode_fed": 0, "short_first_chunk": 0}


def _decode_max_new_tokens() -> int:
    try:
        import mla_patch

        return int(mla_patch.DECODE_MAX_NEW_TOKENS)
    except (ImportError, AttributeError):
        return 8


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> input_ids [B, L] long, attention_mask [B, L] long (0 on padding)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: each sequence's first real token is position 0, as when scored alone.
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def new_cache(model):
    """The cache the decode path runs on: the patch's latent cache on a patched model, else DynamicCache."""
    try:
        import mla_patch
        from mla_patch.attention import MlaAttentionMixin
    except ImportError:
        MlaAttentionMixin = None
    if MlaAttentionMixin is not None and any(isinstance(m, MlaAttentionMixin) for m in model.modules()):
        if hasattr(mla_patch, "new_latent_cache"):
            return mla_patch.new_latent_cache(model)
        return mla_patch.LatentCache(config=model.config)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def prefill_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One full forward (no cache). Returns float32 log-probs [B, L, V]; row t predicts token t+1."""
    out = model(input_ids, attention_mask, _positions(attention_mask), use_cache=False)
    return torch.log_softmax(out.logits.float(), dim=-1)


@torch.no_grad()
def decode_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefill_len: int = DEFAULT_PREFILL_LEN,
    decode_step: int = DEFAULT_DECODE_STEP,
) -> torch.Tensor:
    """Prefill columns [0, prefill_len), then teacher-forced decode of the rest, `decode_step` at a time.

    input_ids, attention_mask: [B, L] (left padding). Returns float32 log-probs [B, L, V].
    The cache goes in positionally: transformers 5.17 names it `past_key_values`, 5.24 `cache`.
    """
    B, L = input_ids.shape
    positions = _positions(attention_mask)
    cache = new_cache(model)
    P = max(1, min(prefill_len, L))
    out = model(input_ids[:, :P], attention_mask[:, :P], positions[:, :P], cache, use_cache=True)
    if P <= _decode_max_new_tokens():
        STATS["short_first_chunk"] += B * P
    chunks = [torch.log_softmax(out.logits.float(), dim=-1)]
    for s in range(P, L, decode_step):
        e = min(s + decode_step, L)
        out = model(input_ids[:, s:e], attention_mask[:, :e], positions[:, s:e], cache, use_cache=True)
        STATS["decode_fed"] += B * (e - s)
        chunks.append(torch.log_softmax(out.logits.float(), dim=-1))
    return torch.cat(chunks, dim=1)


def score_requests(
    model,
    requests: list[tuple[list[int], list[int]]],
    pad_id: int,
    max_length: int,
    scoring: str = "decode",
    batch_size: int = 8,
    prefill_len: int = DEFAULT_PREFILL_LEN,
    decode_step: int = DEFAULT_DECODE_STEP,
) -> list[tuple[float, bool]]:
    """(context tokens, continuation tokens) pairs -> (sum log p(continuation), continuation is greedy).

    Batched longest-first with left padding, so every continuation ends in the last column. A request
    longer than max_length + 1 keeps its last max_length + 1 tokens (as lm-eval's HFLM does).
    """
    if scoring not in ("decode", "prefill"):
        raise ValueError(f"scoring must be 'decode' or 'prefill', got {scoring!r}")
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        inps = [(requests[i][0] + requests[i][1])[-(max_length + 1) :][:-1] for i in idx]
        ids, mask = left_pad(inps, pad_id, device)
        if scoring == "decode":
            logp = decode_logprobs(model, ids, mask, prefill_len, decode_step)
        else:
            logp = prefill_logprobs(model, ids, mask)
        for row, i in enumerate(idx):
            cont = torch.tensor(requests[i][1], dtype=torch.long, device=device)
            lp = logp[row, -len(cont) :]
            ll = lp.gather(-1, cont[:, None])[:, 0].double().sum().item()
            results[i] = (ll, bool((lp.argmax(-1) == cont).all()))
    return results  # type: ignore[return-value]
