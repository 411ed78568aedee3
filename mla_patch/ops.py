"""The absorbed MLA decode op: argument checks, then the CUDA kernel or the PyTorch reference.

This is the only caller of the extension `mla_patch._C`. It is loaded lazily; when it is missing,
was built for another torch, or cannot serve a case (CPU tensors, float32, dims it was not built
for), the reference in `reference.py` runs instead and the reason is logged once.
"""

from __future__ import annotations

import logging
import math

import torch

from .reference import mla_decode_ref

logger = logging.getLogger("mla_patch")

# (kv_lora_rank, qk_rope_head_dim) pairs the kernel is instantiated for.
KERNEL_DIMS = {(512, 64), (256, 32)}
KERNEL_DTYPES = {torch.float16, torch.bfloat16}

_ext = None
_ext_error: str | None = None
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("mla_patch: decode attention uses the PyTorch reference: %s", reason)


def load_extension():
    """Import mla_patch._C once; returns the module or None (see `extension_error()`)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.mla_patch.*)

            _ext = _C
        except ImportError as err:
            _ext_error = (
                "the CUDA extension mla_patch._C is not built "
                f"({err}); build it with `pip install -e . --no-build-isolation` on a machine with nvcc"
            )
        except OSError as err:  # undefined symbols: built against another torch
            _ext_error = f"the CUDA extension mla_patch._C does not load with this torch ({err}); rebuild it"
    return _ext


def extension_error() -> str | None:
    load_extension()
    return _ext_error


def has_kernel() -> bool:
    return load_extension() is not None


def check_decode_args(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale: float = 1.0, row_index=None) -> None:
    """Raise a ValueError naming the argument when shapes, dtypes or devices disagree."""
    tensors = dict(q_latent=q_latent, q_pe=q_pe, c_kv=c_kv, k_pe=k_pe, kv_start=kv_start, kv_end=kv_end)
    if row_index is not None:
        tensors["row_index"] = row_index
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mla_decode: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q_latent.dim() != 4 or q_pe.dim() != 4:
        raise ValueError(
            f"mla_decode: q_latent and q_pe must be [B, S, H, *], got {tuple(q_latent.shape)} and {tuple(q_pe.shape)}"
        )
    B, S, H, R = q_latent.shape
    P = q_pe.shape[-1]
    if tuple(q_pe.shape[:3]) != (B, S, H):
        raise ValueError(f"mla_decode: q_pe {tuple(q_pe.shape)} does not match q_latent {tuple(q_latent.shape)}")
    if row_index is not None:  # a paged cache: pools of rows and a [B, T] row table
        if row_index.dim() != 2 or row_index.shape[0] != B or row_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"mla_decode: row_index must be an int32/int64 [B={B}, T] tensor, got "
                             f"{row_index.dtype} {tuple(row_index.shape)}")
        if c_kv.dim() != 2 or c_kv.shape[1] != R:
            raise ValueError(f"mla_decode: with row_index, c_kv must be a pool of rows [M, R={R}], got {tuple(c_kv.shape)}")
        if k_pe.dim() != 2 or tuple(k_pe.shape) != (c_kv.shape[0], P):
            raise ValueError(f"mla_decode: with row_index, k_pe must be [M={c_kv.shape[0]}, P={P}], got {tuple(k_pe.shape)}")
    else:
        if c_kv.dim() != 3 or c_kv.shape[0] != B or c_kv.shape[2] != R:
            raise ValueError(f"mla_decode: c_kv must be [B={B}, T, R={R}], got {tuple(c_kv.shape)}")
        if k_pe.dim() == 3 and k_pe.shape[-1] != P:
            raise ValueError(f"mla_decode: q_pe has rope dim {P} but k_pe has {k_pe.shape[-1]}")
        if k_pe.dim() != 3 or tuple(k_pe.shape) != (B, c_kv.shape[1], P):
            raise ValueError(f"mla_decode: k_pe must be [B={B}, T={c_kv.shape[1]}, P={P}], got {tuple(k_pe.shape)}")
    for name in ("kv_start", "kv_end"):
        t = tensors[name]
        if t.shape != (B,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"mla_decode: {name} must be an int32/int64 tensor of shape [{B}], got {t.dtype} {tuple(t.shape)}")
    if not q_latent.is_floating_point():
        raise ValueError(f"mla_decode: q_latent must be floating point, got {q_latent.dtype}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"mla_decode: sm_scale must be a finite number, got {sm_scale}")
    for name in ("q_pe", "c_kv", "k_pe"):  # name the argument that disagrees with q_latent
        if tensors[name].dtype != q_latent.dtype:
            raise ValueError(
                f"mla_decode: {name} has dtype {tensors[name].dtype} but q_latent has {q_latent.dtype}; "
                "q_latent, q_pe, c_kv and k_pe must share one dtype"
            )
    for name, t in tensors.items():
        if t.device != q_latent.device:
            raise ValueError(
                f"mla_decode: {name} is on {t.device} but q_latent is on {q_latent.device}; all tensors must be on one device"
            )


def kernel_unsupported_reason(q_latent, q_pe, c_kv, k_pe) -> str | None:
    """None when the CUDA kernel can serve these inputs, else why not."""
    if not q_latent.is_cuda:
        return f"inputs are on {q_latent.device.type}, the kernel needs CUDA"
    if load_extension() is None:
        return _ext_error
    if q_latent.dtype not in KERNEL_DTYPES:
        return f"dtype {q_latent.dtype} (the kernel serves float16 and bfloat16)"
    dims = (q_latent.shape[-1], q_pe.shape[-1])
    if dims not in KERNEL_DIMS:
        return f"kv_lora_rank/rope dims {dims} (the kernel is built for {sorted(KERNEL_DIMS)})"
    for name, t in dict(q_latent=q_latent, q_pe=q_pe, c_kv=c_kv, k_pe=k_pe).items():
        # What the binding requires (else it raises): last dim contiguous, 16-byte aligned base and
        # outer strides (8 elements); reasons carry no numbers, so each is logged once.
        if t.stride(-1) != 1:
            return f"{name} is not contiguous in its last dim"
        if any(t.stride(d) % 8 and t.shape[d] != 1 for d in range(t.dim() - 1)):
            return f"{name} is not 16-byte aligned (outer strides)"
        # A traced graph has no addresses: there the binding's own check raises on a misaligned base.
        if not torch.compiler.is_compiling() and t.data_ptr() % 16:
            return f"{name} is not 16-byte aligned (base)"
    return None


def mla_decode(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale: float, backend: str = "auto", row_index=None):
    """Absorbed decode attention; see `reference.mla_decode_ref` for the contract (row_index: a paged cache).

    backend: "auto" (kernel when it can serve, else the reference, reason logged once),
    "kernel" (raise if it cannot serve) or "torch" (always the reference).
    Returns (out_latent [B, S, H, R] in the input dtype, lse [B, S, H] float32).
    """
    check_decode_args(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, row_index)
    if backend == "torch":
        return mla_decode_ref(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, row_index=row_index)
    if backend not in ("auto", "kernel"):
        raise ValueError(f"mla_decode: backend must be 'auto', 'kernel' or 'torch', got {backend!r}")
    reason = kernel_unsupported_reason(q_latent, q_pe, c_kv, k_pe)
    if reason is not None:
        if backend == "kernel":
            raise RuntimeError(f"mla_decode: the CUDA kernel cannot serve this call: {reason}")
        _warn_once(reason)
        return mla_decode_ref(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, row_index=row_index)
    return torch.ops.mla_patch.mla_decode(
        q_latent, q_pe, c_kv, k_pe, as_kernel_index(kv_start), as_kernel_index(kv_end), float(sm_scale),
        as_kernel_index(row_index),
    )


def as_kernel_index(t):
    """An index tensor (ranges, row table) as the kernel takes it: contiguous int32; None stays None."""
    return None if t is None else t.to(torch.int32).contiguous()
