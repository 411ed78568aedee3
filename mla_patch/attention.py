"""The patched MLA attention forward: vanilla prefill, absorbed decode, and the dispatch.

Dispatch is decided from shapes only (so it holds under torch.compile and CUDA graphs): a call
with a cache and at most DECODE_MAX_NEW_TOKENS new tokens per sequence is decode and runs
absorbed over the latent cache; anything else (prefill, training, no cache) is the stock
forward of transformers, untouched.

Absorbed decode, per layer (B batch, S new tokens, H heads, R = kv_lora_rank, P = rope dim):
    q_nope, q_pe  = split(q_proj(x))                 [B, H, S, nope], [B, H, S, P]
    c, k_pe       = kv_a_layernorm / rope of kv_a_proj_with_mqa(x), appended to the cache
    q_latent      = q_nope @ W_UK (per head)          [B, S, H, R]
    out_latent    = softmax((q_latent c^T + q_pe k_pe^T) * scaling) c      (ops.mla_decode)
    out           = o_proj(out_latent @ W_UV^T)       no per-head K/V is ever formed
"""

from __future__ import annotations

import weakref

import torch

from . import decode_fast_path, ops, paged
from .absorb import absorb_unsupported_reason, local_heads, merged_weights, offloaded_linears, split_kv_b, weights_loaded
from .cache import captured_step
from .ranges import masked_ranges, unmasked_ranges

# Few new tokens on a cached prefix run absorbed. Absorbed cost grows with S (each new token
# reads the whole latent cache for all heads); vanilla re-expands the whole cache through
# kv_b_proj once per call, whatever S. For DeepSeek dims the absorbed attention FLOPs stay
# under a tenth of vanilla's up to S = 8 (S * 1088 vs 131072 + S * 320 per cached token and
# head), and assisted / speculative decoding appends at most a handful of tokens. See the
# README ("Decode threshold") for the measurement behind the value.
DECODE_MAX_NEW_TOKENS = 8

PATCHED_MODULES: "weakref.WeakSet" = weakref.WeakSet()  # live modules of our classes, for unpatch()
_stats = {"absorbed_calls": 0, "absorbed_tokens": 0, "prefill_calls": 0, "vanilla_fallbacks": 0, "graph_replays": 0}
_warned: set[str] = set()
_first_absorbed_layer: list[int] = []  # lowest layer_idx seen on the absorbed path: tokens count there once


def decode_stats() -> dict[str, int]:
    """Counters of what the patched layers ran (eager mode only; compiled graphs don't count)."""
    return dict(_stats)


def reset_decode_stats() -> None:
    for key in _stats:
        _stats[key] = 0
    _first_absorbed_layer.clear()


def _count(key: str, amount: int = 1) -> None:
    if not torch.compiler.is_compiling():
        _stats[key] += amount


def _warn_once(message: str) -> None:
    if message not in _warned and not torch.compiler.is_compiling():
        _warned.add(message)
        ops.logger.warning("mla_patch: %s", message)


# -- the forward ---------------------------------------------------------------------------------------


class MlaAttentionMixin:
    """Mixed into a copy of each family's attention class (see patch.py); adds no parameters."""

    _mla_family = None  # MlaFamily, set on the generated subclass
    _mla_original_class = None
    mla_backend = "auto"  # "auto" | "kernel" | "torch"; each instance holds its own (patch.py)
    mla_absorb = "per_head"  # "per_head" | "merged"
    # The options patch() was last called with (class-level): taken by each layer when it is built, so a later
    # patch() with other options changes the models built after it, never a live one.
    _mla_new_options = ("auto", "per_head")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mla_backend, self.mla_absorb = type(self)._mla_new_options
        PATCHED_MODULES.add(self)

    def forward(self, *args, **kwargs):
        bound = self._mla_bind(args, kwargs)
        hidden_states = bound["hidden_states"]
        cache = bound.get("cache", bound.get("past_key_values"))
        num_new = hidden_states.shape[1]
        if cache is not None and paged.is_paged_cache(cache):  # continuous batching: requests packed in one row
            out = self._mla_paged_forward(hidden_states, cache, bound, kwargs)
            if out is not None:
                return out
            _count("vanilla_fallbacks")
            return super().forward(*args, **kwargs)
        if cache is None or num_new > DECODE_MAX_NEW_TOKENS:
            _count("prefill_calls")
            return super().forward(*args, **kwargs)
        reason = self._mla_decode_unsupported(bound["attention_mask"])
        if reason is not None:
            _warn_once(f"decode runs the stock attention for {type(self).__name__}: {reason}")
            _count("vanilla_fallbacks")
            return super().forward(*args, **kwargs)
        read_directly = (self.kv_b_proj, self.q_proj or self.q_b_proj, self.o_proj) if self.mla_absorb == "merged" else (self.kv_b_proj,)
        offloaded = offloaded_linears(*read_directly)
        if offloaded:
            with weights_loaded(offloaded):
                out = self._mla_absorbed_decode(hidden_states, bound["attention_mask"], cache, bound, kwargs)
        else:  # the usual case, kept free of context managers for torch.compile
            out = self._mla_absorbed_decode(hidden_states, bound["attention_mask"], cache, bound, kwargs)
        if out is None:  # the mask was not a per-row range: the stock path handles any mask
            _warn_once("an attention mask that is not one contiguous range per row; using the stock attention")
            _count("vanilla_fallbacks")
            return super().forward(*args, **kwargs)
        return out

    def _mla_bind(self, args, kwargs) -> dict:
        """Name the arguments whatever order this family's forward takes them in."""
        if len(args) <= 1 and "hidden_states" not in kwargs:
            bound = dict(kwargs)
            if args:
                bound["hidden_states"] = args[0]
        elif not args:
            bound = dict(kwargs)
        else:
            names = type(self)._mla_arg_names
            bound = dict(zip(names, args))
            bound.update(kwargs)
        bound.setdefault("attention_mask", None)
        return bound

    def _mla_decode_unsupported(self, attention_mask) -> str | None:
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() in (2, 4)):
            return f"attention mask of type {type(attention_mask).__name__} (e.g. flex attention's BlockMask)"
        return absorb_unsupported_reason(self)

    def _mla_project(self, hidden_states, bound, merged):
        """The query and the new latents of these tokens: (q_in, q_nope [B, H, S, nope], q_pe [B, H, S, P] roped,
        c_new [B, 1, S, R], k_pe_new [B, 1, S, P] roped, sm_scale)."""
        batch, num_new, _ = hidden_states.shape
        heads, nope, rope_dim, rank = local_heads(self), self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q_in = hidden_states
            q = self.q_proj(hidden_states)
        else:
            q_in = self.q_a_layernorm(self.q_a_proj(hidden_states))
            q = self.q_b_proj(q_in)
        q = q.view(batch, num_new, heads, self.qk_head_dim).transpose(1, 2)  # [B, H, S, nope + P]
        q_nope, q_pe = torch.split(q, [nope, rope_dim], dim=-1)
        family, sm_scale = self._mla_family, self.scaling
        q_mult = family.q_scale(self, bound) if family.q_scale is not None else None  # e.g. LongCat, Mistral4
        if q.dtype == torch.float16:
            # q_latent = q_nope @ W_UK can exceed fp16's 65504 where q_nope . k_nope would not (W_UK sums
            # over R); fold the softmax scale into the query first (exact in real arithmetic, same relative
            # rounding) so q_latent is at the size of the logits, and saturate below instead of making inf.
            q_mult, sm_scale = (sm_scale if q_mult is None else q_mult * sm_scale), 1.0
        if isinstance(q_mult, torch.Tensor):
            q_mult = q_mult.to(q.dtype)
        if q_mult is not None:  # [B, H, S, 1] or a number; rope is linear, so scaling before it is the same
            q_nope, q_pe = q_nope * q_mult, q_pe * q_mult
            if merged:  # q_latent comes from q_in there: [B, S, q_in] takes the [B, S, 1] of the multiplier
                q_in = q_in * (q_mult[:, 0] if isinstance(q_mult, torch.Tensor) and q_mult.dim() == 4 else q_mult)

        compressed = self.kv_a_proj_with_mqa(hidden_states)
        c_new, k_pe_new = torch.split(compressed, [rank, rope_dim], dim=-1)
        c_new = self.kv_a_layernorm(c_new)
        if family.latent_scale is not None:  # LongCat caches the normalized latent times a constant
            c_new = c_new * family.latent_scale(self)
        c_new = c_new.view(batch, 1, num_new, rank)
        k_pe_new = k_pe_new.view(batch, 1, num_new, rope_dim)
        q_pe, k_pe_new = family.rope(self, q_pe, k_pe_new, bound.get("position_embeddings"))
        return q_in, q_nope, q_pe, c_new, k_pe_new, sm_scale

    def _mla_absorbed_decode(self, hidden_states, attention_mask, cache, bound, kwargs):
        batch, num_new, _ = hidden_states.shape
        ranges = None
        step = captured_step(cache, self.layer_idx)
        if step is not None:  # a step graphs.py records: its ranges are device tensors it refills each replay
            ranges = (step.kv_start, step.kv_end)
        elif attention_mask is not None:
            ranges = masked_ranges(attention_mask, num_new)
            if ranges is None:
                return None

        merged = self.mla_absorb == "merged"
        if merged and hasattr(self.o_proj.weight, "to_local"):
            # Tensor parallel: W_UV.W_O would skip o_proj's all-reduce across ranks; per-head keeps it.
            _warn_once("absorb='merged' under tensor parallelism runs per-head")
            merged = False
        q_in, q_nope, q_pe, c_new, k_pe_new, sm_scale = self._mla_project(hidden_states, bound, merged)
        family = self._mla_family

        c_kv, k_pe = cache.update(c_new, k_pe_new, self.layer_idx)
        if ranges is None:
            layer = cache.layers[self.layer_idx] if hasattr(cache, "layers") else None
            kv_end = getattr(layer, "cumulative_length", None)  # static layers: the buffer is max_cache_len long
            if not isinstance(kv_end, torch.Tensor):
                kv_end = c_kv.shape[-2]
            ranges = unmasked_ranges(batch, kv_end, hidden_states.device)

        q_latent = self._mla_query_latent(q_in, q_nope, merged)
        q_pe = q_pe.transpose(1, 2)  # [B, S, H, P]

        want_probs = bool(kwargs.get("output_attentions", False))
        c_rows, k_pe_rows = c_kv[:, 0], k_pe[:, 0]  # [B, T, R], [B, T, P] views, no copy
        if want_probs:
            from .reference import mla_decode_ref

            out_latent, _, attn_weights = mla_decode_ref(
                q_latent, q_pe, c_rows, k_pe_rows, *ranges, sm_scale, return_probs=True
            )
            attn_weights = attn_weights.to(hidden_states.dtype)
        else:
            out_latent, _ = ops.mla_decode(q_latent, q_pe, c_rows, k_pe_rows, *ranges, sm_scale,
                                           backend=self._mla_op_backend(hidden_states))
            attn_weights = None
        self._mla_count_absorbed(batch * num_new)
        if family.out_gate is not None:  # per-head output gate (Ling 3): linear per head, so it scales out_latent
            out_latent = out_latent * family.out_gate(self, hidden_states).unsqueeze(-1)

        return self._mla_output(out_latent, merged), attn_weights

    def _mla_op_backend(self, hidden_states) -> str:
        """The layer's backend, except the reference when a gradient is wanted (the kernel has no backward)."""
        if self.mla_backend != "torch" and torch.is_grad_enabled() and hidden_states.requires_grad:
            return "torch"
        return self.mla_backend

    def _mla_count_absorbed(self, tokens: int) -> None:
        """One absorbed call; its tokens count once a step, at the first patched layer (not layer 0: hybrids such
        as Kimi-Linear start with non-MLA layers)."""
        _count("absorbed_calls")
        if not torch.compiler.is_compiling():
            if not _first_absorbed_layer or self.layer_idx < _first_absorbed_layer[0]:
                _first_absorbed_layer[:] = [self.layer_idx]
            if self.layer_idx == _first_absorbed_layer[0]:
                _count("absorbed_tokens", tokens)

    def _mla_paged_unsupported(self, cache) -> str | None:
        family = self._mla_family
        if family.latent_scale is not None or family.out_gate is not None:
            return f"continuous batching runs the stock attention for {family.model_type}"
        if paged.latent_pools(cache, self.layer_idx) is None:
            return "this transformers' continuous-batching cache does not hold MLA latents"
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "continuous batching under CUDA graphs (the step's layout is read on the host)"
        return absorb_unsupported_reason(self)

    def _mla_paged_forward(self, hidden_states, cache, bound, kwargs):
        """A continuous-batching step (see paged.py): decode tokens absorbed over their pool rows in place, prefill
        chunks by the stock computation (their history expanded through kv_b_proj, causal SDPA). None where this
        layer cannot (the caller runs the stock forward, which handles the whole step)."""
        if kwargs.get("block_table") is not None:  # a decode-only step on the fast path (decode_fast_path.py)
            return self._mla_block_table_forward(hidden_states, cache, bound, kwargs)
        reason = self._mla_paged_unsupported(cache)
        if reason is not None:
            _warn_once(reason)
            return None
        c_pool, k_pool = paged.latent_pools(cache, self.layer_idx)
        q_in, q_nope, q_pe, c_new, k_pe_new, sm_scale = self._mla_project(hidden_states, bound, merged=False)
        layer_kwargs = paged.write_latents(cache, self.layer_idx, c_new, k_pe_new, kwargs)
        layout = paged.step_layout(cache, self.layer_idx, kwargs, layer_kwargs, DECODE_MAX_NEW_TOKENS)
        heads, nope, v_dim = local_heads(self), self.qk_nope_head_dim, self.v_head_dim
        values = hidden_states.new_zeros(hidden_states.shape[1], heads * v_dim)  # per-head outputs, before o_proj
        tokens = layout.decode_tokens
        if tokens.numel():  # each decode token as a sequence of one, over its request's pool rows
            q_latent = self._mla_query_latent(None, q_nope[0, :, tokens].transpose(0, 1).unsqueeze(2), merged=False)
            q_pe_tokens = q_pe[0, :, tokens].transpose(0, 1).unsqueeze(1)  # [N, 1, H, P]
            kv_start = torch.zeros_like(layout.kv_end)
            out_latent, _ = ops.mla_decode(q_latent, q_pe_tokens, c_pool, k_pool, kv_start, layout.kv_end, sm_scale,
                                           backend=self._mla_op_backend(hidden_states), row_index=layout.row_table)
            values[tokens] = self._mla_values(out_latent).reshape(tokens.numel(), -1)
            self._mla_count_absorbed(tokens.numel())
        for q0, q1, k0, k1 in layout.prefill:  # the stock computation, one request at a time
            rows = layout.rows[k0:k1].long()
            latent = self.kv_b_proj(c_pool[rows]).view(k1 - k0, heads, nope + v_dim)
            k_nope, value = torch.split(latent, [nope, v_dim], dim=-1)
            k_rope = k_pool[rows][:, None, :].expand(-1, heads, -1)
            keys = torch.cat((k_nope, k_rope), dim=-1).transpose(0, 1)  # [H, L, D]
            queries = torch.cat((q_nope[0, :, q0:q1], q_pe[0, :, q0:q1]), dim=-1)  # [H, Lq, D]
            seen = torch.arange(k1 - k0, device=rows.device)
            causal = seen[None, :] <= (k1 - k0 - (q1 - q0) + torch.arange(q1 - q0, device=rows.device))[:, None]
            out = torch.nn.functional.scaled_dot_product_attention(
                queries, keys, value.transpose(0, 1), attn_mask=causal, scale=sm_scale
            )
            values[q0:q1] = out.transpose(0, 1).reshape(q1 - q0, -1)
        if layout.prefill:
            _count("prefill_calls")
        return self.o_proj(values[None]), None

    def _mla_block_table_forward(self, hidden_states, cache, bound, kwargs):
        """A decode-only continuous-batching step (one new token per request, padded to a static size): the new
        latents go to the rows the block table gives, then each token runs absorbed over its request's rows. Only
        device work, so transformers can capture the step in a CUDA graph."""
        c_pool, k_pool = paged.latent_pools(cache, self.layer_idx)
        q_in, q_nope, q_pe, c_new, k_pe_new, sm_scale = self._mla_project(hidden_states, bound, merged=False)
        step = decode_fast_path.block_table_step(cache, self.layer_idx, kwargs)
        tokens = hidden_states.shape[1]
        if step.row_table.shape[0] != tokens:
            raise RuntimeError(f"mla_patch: a decode fast-path step of {tokens} tokens came with "
                               f"{step.row_table.shape[0]} block-table rows; this transformers' fast path is not "
                               "the one mla_patch serves (one token per request)")
        c_pool.index_copy_(0, step.write_rows, c_new.reshape(tokens, -1))
        k_pool.index_copy_(0, step.write_rows, k_pe_new.reshape(tokens, -1))
        q_latent = self._mla_query_latent(None, q_nope[0].transpose(0, 1).unsqueeze(2), merged=False)  # [N, 1, H, R]
        q_pe_tokens = q_pe[0].transpose(0, 1).unsqueeze(1)  # [N, 1, H, P]
        out_latent, _ = ops.mla_decode(q_latent, q_pe_tokens, c_pool, k_pool, torch.zeros_like(step.kv_end),
                                       step.kv_end, sm_scale, backend=self._mla_op_backend(hidden_states),
                                       row_index=step.row_table)
        self._mla_count_absorbed(tokens)
        return self.o_proj(self._mla_values(out_latent).reshape(1, tokens, -1)), None

    def _mla_query_latent(self, q_in, q_nope, merged):
        """q_latent [B, S, H, R]: the query with W_UK folded in (merged: from q_in through W_Q.W_UK)."""
        heads, batch, num_new = q_nope.shape[1], q_nope.shape[0], q_nope.shape[2]
        if merged:
            w_qk, _ = merged_weights(self)
            q_latent = torch.einsum("bsq,hqr->bshr", q_in, w_qk)
        else:
            w_uk, _ = split_kv_b(self)
            # [H, B*S, nope] @ [H, nope, R]: one batched matmul over heads.
            q_heads = q_nope.permute(1, 0, 2, 3).reshape(heads, batch * num_new, self.qk_nope_head_dim)
            q_latent = torch.bmm(q_heads, w_uk).view(heads, batch, num_new, self.kv_lora_rank).permute(1, 2, 0, 3)
        if q_latent.dtype == torch.float16:
            q_latent = q_latent.clamp(-65504.0, 65504.0)  # the kernel takes q in the cache dtype: no inf
        return q_latent

    def _mla_output(self, out_latent, merged):
        """The layer's output [B, S, hidden] from out_latent [B, S, H, R]: W_UV, then o_proj (merged: W_UV.W_O)."""
        batch, num_new, heads, rank = out_latent.shape
        if merged:
            _, w_uvo = merged_weights(self)
            out = torch.einsum("bshr,hrd->bsd", out_latent, w_uvo)
            return out + self.o_proj.bias if self.o_proj.bias is not None else out
        return self.o_proj(self._mla_values(out_latent))

    def _mla_values(self, out_latent):
        """Per-head outputs [B, S, H * v] from out_latent [B, S, H, R] through W_UV."""
        batch, num_new, heads, rank = out_latent.shape
        _, w_uv = split_kv_b(self)
        # [H, B*S, R] @ [H, R, v] -> [B, S, H * v]
        out_heads = out_latent.permute(2, 0, 1, 3).reshape(heads, batch * num_new, rank)
        out = torch.bmm(out_heads, w_uv.transpose(1, 2))
        return out.view(heads, batch, num_new, self.v_head_dim).permute(1, 2, 0, 3).reshape(batch, num_new, -1)

