"""Continuous batching's decode fast path, opened to patched MLA models.

transformers' continuous batching runs a step whose requests all decode one token on a "decode fast path": each
request's pages come as a block table instead of gathered read indices, the batch is padded to a power of two and,
with graphs on, each padded size replays one CUDA graph. transformers offers the path to flash attention only, and
not to MLA's latent pages (`MLACacheAllocator.supports_block_table = False`): stock MLA re-expands every request's
history each step. The absorbed decode reads the pages row by row, so for a model whose MLA layers are all patched
the path is switched on:
  - the MLA allocator says it serves block tables (the fill_block_table it inherits gives page numbers of a
    layer's row view, `allocator.tokens_per_page` rows each);
  - resolving the continuous-batching config keeps `max_blocks_per_request` for such a model (transformers zeroes
    it for attention other than flash);
  - its layers turn the block table into pool rows on the device (`block_table_step`), so a step has static shapes
    and, for a model on CUDA whose step can be captured (`captures_safely`), its decode steps replay CUDA graphs unless
    the user chose otherwise (transformers' default for attention that needs a mask is no graphs; the absorbed decode
    needs none): 4.9x stock's output tokens/s instead of 3.7x eager on the V2-Lite shape, 64 x 4K prompts
    (docs/BENCHMARKS.md, Serving).
Every other model keeps transformers' rules (for an unpatched MLA model the path stays off).
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass

import torch

_serving_model = contextvars.ContextVar("mla_patch_fast_path_model", default=False)
_graphs_by_default = contextvars.ContextVar("mla_patch_fast_path_graphs", default=False)
_installed: dict[str, tuple[object, str, object]] = {}  # hook name -> (owner, attribute, previous value)


def _targets():
    """transformers' objects the hooks wrap, or None where this transformers has no such fast path (before 5.25)."""
    try:
        from transformers.generation.continuous_batching import continuous_api, initialization
        from transformers.generation.continuous_batching.cache_allocators import MLACacheAllocator
    except ImportError:
        return None
    needed = (hasattr(initialization, "ensure_decode_fast_path_is_available")
              and hasattr(initialization, "decide_use_cuda_graphs")
              and hasattr(continuous_api, "ContinuousBatchingManager")
              and hasattr(MLACacheAllocator, "fill_block_table"))
    return (initialization, continuous_api.ContinuousBatchingManager, MLACacheAllocator) if needed else None


def serves_block_table(model) -> bool:
    """Whether every MLA layer of `model` is patched and can run the paged absorbed decode, with no other attention
    type beside them."""
    from .absorb import absorb_unsupported_reason
    from .attention import MlaAttentionMixin
    from .families import FAMILIES

    stock_names = {f.attention_class for f in FAMILIES.values()}
    patched = []
    for module in model.modules():
        if isinstance(module, MlaAttentionMixin):
            patched.append(module)
        elif type(module).__name__ in stock_names:
            return False
    config = model.config.get_text_config()
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return bool(patched) and layer_types == {"full_attention"} and all(
        m._mla_family.latent_scale is None and m._mla_family.out_gate is None and absorb_unsupported_reason(m) is None
        for m in patched
    )


def captures_safely(model) -> bool:
    """Whether a CUDA graph can hold this model's decode step: the model is on CUDA and every MoE block's experts run
    without reading the routing on the host (`_experts_capture`)."""
    if model.device.type != "cuda":
        return False
    # Experts modules are those transformers' use_experts_implementation built: it sets is_concatenated on each
    # (5.17 through 5.25; _is_expert_parallel only came later).
    return all(_experts_capture(m, model.device) for m in model.modules() if hasattr(m, "is_concatenated"))


def _experts_capture(experts, device) -> bool:
    """transformers' eager experts loop on the host over the experts hit. grouped_mm is torch's grouped GEMM only for
    bfloat16 on sm90/sm100; elsewhere torch falls back to a loop that copies the offsets to the host. batched_mm
    (and any other) stays on the device."""
    implementation = getattr(experts.config, "_experts_implementation", None)
    if implementation in (None, "eager"):
        return False
    if implementation == "grouped_mm":
        weight = next(experts.parameters())
        return weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    return True


def install() -> None:
    """Wrap transformers' continuous-batching set-up (idempotent); nothing where it has no such fast path."""
    targets = _targets()
    if targets is None or _installed:
        return
    initialization, manager, allocator = targets

    def wrap(owner, name, make):
        previous = owner.__dict__[name]
        _installed[name] = (owner, name, previous)
        setattr(owner, name, make(previous))

    def manager_init(original):
        @functools.wraps(original)
        def __init__(self, model, *args, **kwargs):
            ours = serves_block_table(model)
            token = _serving_model.set(ours)
            graphs_token = _graphs_by_default.set(ours and captures_safely(model))
            try:
                original(self, model, *args, **kwargs)
            finally:
                _serving_model.reset(token)
                _graphs_by_default.reset(graphs_token)
        return __init__

    def ensure_fast_path(original):
        @functools.wraps(original)
        def ensure(config, cb_config, user_requested):
            wanted = cb_config.max_blocks_per_request
            original(config, cb_config, user_requested)
            if _serving_model.get():
                cb_config.max_blocks_per_request = wanted
            elif getattr(config, "kv_lora_rank", None) is not None:
                cb_config.max_blocks_per_request = 0  # unpatched MLA: its attention cannot read a block table
        return ensure

    def decide_graphs(original):
        @functools.wraps(original)
        def decide(cb_config, is_attn_mask_needed, cuda_graph_requested):
            chosen = cb_config.use_cuda_graph is not None or cuda_graph_requested
            original(cb_config, is_attn_mask_needed, cuda_graph_requested)
            ours = _graphs_by_default.get() and cb_config.max_blocks_per_request > 0
            if ours and not chosen and cb_config.decode_compile_config is None:
                cb_config.use_cuda_graph = (cb_config.use_cuda_graph[0], True)
        return decide

    wrap(manager, "__init__", manager_init)
    wrap(initialization, "ensure_decode_fast_path_is_available", ensure_fast_path)
    wrap(initialization, "decide_use_cuda_graphs", decide_graphs)
    _installed["supports_block_table"] = (allocator, "supports_block_table", allocator.__dict__["supports_block_table"])
    allocator.supports_block_table = True


def uninstall() -> None:
    for owner, name, previous in _installed.values():
        setattr(owner, name, previous)
    _installed.clear()


@dataclass
class BlockTableStep:
    """One fast-path step for the layers of one allocator: token i is request i's one new token."""

    row_table: torch.Tensor  # [N, blocks * page] int32, request i's history as pool rows, in order
    kv_end: torch.Tensor  # [N] int32, rows request i sees (its history and the new token); 0 for padding
    write_rows: torch.Tensor  # [N] int64, the pool row of the new token (the allocator's trash row for padding)


def block_table_step(cache, layer_idx: int, kwargs: dict) -> BlockTableStep:
    """Pool rows of this step from the block table and the key lengths, on the device (no host read: it is captured
    in a graph). Worked out at the allocator's first layer, reused by the others."""
    allocator = cache.layer_to_allocator[layer_idx]
    held = cache.__dict__.setdefault("_mla_block_table_steps", {})
    if layer_idx != min(allocator.layer_indices) and allocator.index in held:
        return held[allocator.index]
    pages = kwargs["block_table"][allocator.index]  # [N, blocks] int32, -1 past a request's pages
    cu_k = kwargs["cu_seq_lens_k"][allocator.layer_type]
    kv_end = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
    page_size = allocator.tokens_per_page
    within = torch.arange(page_size, device=pages.device, dtype=torch.int32)
    rows = pages.clamp(min=0)[:, :, None] * page_size + within  # [N, blocks, page]
    row_table = rows.flatten(1)
    last = (kv_end.long() - 1).clamp(min=0)
    new_rows = row_table.gather(1, last[:, None])[:, 0].long()
    write_rows = torch.where(kv_end > 0, new_rows, torch.full_like(new_rows, allocator.write_trash_index))
    step = BlockTableStep(row_table=row_table, kv_end=kv_end, write_rows=write_rows)
    held[allocator.index] = step
    return step
