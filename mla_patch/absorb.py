"""Weight absorption: the per-head up-projections W_UK and W_UV, taken from kv_b_proj.

kv_b_proj maps the latent c (R wide) to per-head [k_nope | v]: its weight is
[H * (qk_nope_head_dim + v_head_dim), R]. Viewed as [H, nope + v, R], rows [:nope] are W_UK[h]
and rows [nope:] are W_UV[h]. Since k_nope[t] = W_UK[h] c[t],
    q_nope . k_nope[t] = (W_UK[h]^T q_nope) . c[t] = q_latent . c[t],
so the query absorbs W_UK and attention runs on c directly; likewise the head output is
W_UV[h] (sum_t p[t] c[t]), so W_UV is applied once to the latent output.

"per_head" (default) returns views: no copy, no extra memory, always the current weights.
"merged" (the FlashInfer PR #551 variant) materializes W_UQ.W_UK and W_UV.W_O once per layer;
it saves two small matmuls per step and costs a lot of memory (see the README).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def offloaded_linears(*linears: nn.Module | None) -> list[nn.Module]:
    """Those of `linears` whose weight accelerate keeps offloaded (meta until the module's own forward)."""
    return [m for m in linears if m is not None and m.weight.is_meta and hasattr(m, "_hf_hook")]


@contextlib.contextmanager
def weights_loaded(hooked: list[nn.Module]):
    """Materialize the weights of offloaded linears (see `offloaded_linears`) for the block.

    Decode reads kv_b_proj.weight directly instead of calling kv_b_proj, so an offload hook
    (device_map with "cpu"/"disk", cpu_offload) never loads it on its own: run the hook's
    pre_forward for the duration and its post_forward after, as the module's forward would.
    """
    for m in hooked:
        m._hf_hook.pre_forward(m)
    try:
        yield
    finally:
        for m in hooked:
            m._hf_hook.post_forward(m, None)


def _local(weight: torch.Tensor) -> torch.Tensor:
    # Under transformers' tensor parallelism weights are DTensors; this rank computes with its shard.
    return weight.to_local() if hasattr(weight, "to_local") else weight


def local_heads(module: nn.Module) -> int:
    """Heads this module computes: all of them, or this rank's slice under tensor parallelism
    (kv_b_proj is split by output rows there, while `num_heads` keeps the global count)."""
    return _local(module.kv_b_proj.weight).shape[0] // (module.qk_nope_head_dim + module.v_head_dim)


def split_kv_b(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of kv_b_proj.weight: W_UK [H, nope, R] and W_UV [H, v, R] (H = local heads)."""
    weight = _local(module.kv_b_proj.weight)
    per_head = weight.view(local_heads(module), module.qk_nope_head_dim + module.v_head_dim, module.kv_lora_rank)
    return per_head[:, : module.qk_nope_head_dim], per_head[:, module.qk_nope_head_dim :]


def absorb_unsupported_reason(module: nn.Module) -> str | None:
    """None when kv_b_proj is a plain floating-point Linear we can view per head."""
    proj = getattr(module, "kv_b_proj", None)
    if type(proj) is not nn.Linear:
        return f"kv_b_proj is {type(proj).__name__}, not a plain nn.Linear (quantized?)"
    if not proj.weight.is_floating_point() or proj.weight.element_size() < 2:
        return f"kv_b_proj.weight has dtype {proj.weight.dtype}"
    if proj.bias is not None:
        return "kv_b_proj has a bias, which absorption does not carry"
    if proj.weight.is_meta and not hasattr(proj, "_hf_hook"):  # offloaded by accelerate is fine
        return "kv_b_proj.weight is still on the meta device"
    return None


def _weights_key(*params: torch.Tensor | None) -> tuple:
    return tuple((p.data_ptr(), p.dtype, p.device, p._version) if p is not None else None for p in params)


def merged_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """W_QK [H, q_in, R] (q_in = q_lora_rank, or hidden when there is no q_lora) and W_UVO [H, R, hidden].

    Built once and rebuilt only when a source weight changes (dtype, device, or an in-place update).
    They are plain attributes, not buffers, so state_dict and checkpoints are unchanged.
    """
    q_weight = _local(module.q_proj.weight if module.q_lora_rank is None else module.q_b_proj.weight)
    o_weight = _local(module.o_proj.weight)
    key = _weights_key(q_weight, _local(module.kv_b_proj.weight), o_weight)
    cached = getattr(module, "_mla_merged", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    heads, nope, v = local_heads(module), module.qk_nope_head_dim, module.v_head_dim
    w_uk, w_uv = split_kv_b(module)
    with torch.no_grad():
        w_uq = q_weight.view(heads, module.qk_head_dim, -1)[:, :nope]  # [H, nope, q_in]
        # Products in at least float32, stored in the weights' dtype.
        acc = torch.float64 if q_weight.dtype == torch.float64 else torch.float32
        w_qk = torch.matmul(w_uq.transpose(1, 2).to(acc), w_uk.to(acc)).to(q_weight.dtype)  # [H, q_in, R]
        w_o = o_weight.view(-1, heads, v).permute(1, 2, 0)  # [H, v, hidden]
        w_uvo = torch.matmul(w_uv.transpose(1, 2).to(acc), w_o.to(acc)).to(q_weight.dtype)  # [H, R, hidden]
    module._mla_merged = (key, w_qk, w_uvo)
    return w_qk, w_uvo


def merged_extra_bytes(module: nn.Module) -> int:
    """Extra memory the merged variant holds for this layer."""
    q_in = module.hidden_size if module.q_lora_rank is None else module.q_lora_rank
    itemsize = module.kv_b_proj.weight.element_size()
    return module.num_heads * module.kv_lora_rank * (q_in + module.hidden_size) * itemsize
