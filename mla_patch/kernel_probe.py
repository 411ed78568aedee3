"""Run one named CUDA kernel of the decode op and say what ran: for tests, benchmarks and profiling only.

The product calls `ops.mla_decode`, whose kernel and split count the extension's dispatch picks
(`csrc/dispatch.h`). This module reaches the extension's one private op, `_decode_forced`, which takes
that choice as explicit arguments: nothing here is process-wide state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import ops

# The kernels of csrc/, by the names the private op reports (csrc/dispatch.h: enum class Kernel).
KERNELS = ("mma", "seesaw", "narrow")


class Ran(NamedTuple):
    """What a call launched: the kernel, its split-KV count, and whether its query and cache tiles went by TMA."""

    kernel: str
    splits: int
    q_tma: bool
    kv_tma: bool


def decode_forced(
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale: float, *,
    kernel: str = "auto", splits: int = 0, tma: bool = True, timeline: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
):
    """`ops.mla_decode` on the CUDA kernel with the dispatch's choices made explicit.

    kernel: "auto" (the dispatch's choice) or one of KERNELS; a kernel that cannot serve the call raises.
    splits: 0 for the dispatch's split count, else that many (1..128).
    tma: False keeps every tile on cp.async (the path taken where a tensor map does not encode).
    timeline: an int64 CUDA tensor [2, blocks, 32] the kernels stamp per CTA (dev/kernel_timeline.py).
    row_index: a paged cache's row table (see `ops.mla_decode`).
    Returns (out_latent, lse, Ran).
    """
    ops.check_decode_args(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, row_index)
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"decode_forced: kernel must be 'auto' or one of {KERNELS}, got {kernel!r}")
    reason = ops.kernel_unsupported_reason(q_latent, q_pe, c_kv, k_pe)
    if reason is not None:
        raise RuntimeError(f"decode_forced: the CUDA kernel cannot serve this call: {reason}")
    out, lse, ran = torch.ops.mla_patch._decode_forced(
        q_latent, q_pe, c_kv, k_pe, ops.as_kernel_index(kv_start), ops.as_kernel_index(kv_end), float(sm_scale),
        -1 if kernel == "auto" else KERNELS.index(kernel), int(splits), bool(tma), timeline,
        ops.as_kernel_index(row_index),
    )
    return out, lse, Ran(KERNELS[ran[0]], int(ran[1]), bool(ran[2]), bool(ran[3]))
