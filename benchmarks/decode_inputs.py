"""Random inputs of the decode op for the kernel benchmarks: DeepSeek's dims (R = 512, P = 64),
packed cache."""

from __future__ import annotations

import math

import torch

R, P = 512, 64  # kv_lora_rank and rope dims of DeepSeek-V2/V3
SCALE = 192**-0.5  # 1/sqrt(the qk head dim: nope 128 + rope 64), as the models attend


def make_set(B, S, H, L, dtype=torch.bfloat16, gen=None):
    """One input set of the op: (q_latent, q_pe, c_kv, k_pe, kv_start, kv_end), every sequence L rows long.

    c_kv and k_pe are views of one [B, L, R + P] buffer, the cache layout the model's LatentCache keeps."""
    q_latent = torch.randn(B, S, H, R, device="cuda", dtype=dtype, generator=gen)
    q_pe = torch.randn(B, S, H, P, device="cuda", dtype=dtype, generator=gen)
    buf = torch.randn(B, L, R + P, device="cuda", dtype=dtype, generator=gen)
    kv_start = torch.zeros(B, dtype=torch.int32, device="cuda")
    kv_end = torch.full((B,), L, dtype=torch.int32, device="cuda")
    return q_latent, q_pe, buf[..., :R], buf[..., R:], kv_start, kv_end


def cache_bytes(B: int, L: int) -> int:
    """Bytes of bf16 cache one call must read (queries and outputs not counted, as the peers count)."""
    return B * L * (R + P) * 2


def l2_bytes() -> int:
    return torch.cuda.get_device_properties(0).L2_cache_size or 50 * 2**20


def set_count(B: int, L: int, lo: int, hi: int) -> int:
    """How many input sets to rotate through so that their caches total at least 4x the L2 (each call then
    reads its cache from HBM, as a decode step does), within [lo, hi]."""
    return max(lo, min(hi, math.ceil(4 * l2_bytes() / cache_bytes(B, L))))


def parse_cells(text: str) -> list[tuple[int, int, int]]:
    """'H,B,L;H,B,L' -> [(H, B, L), ...]."""
    return [tuple(int(v) for v in cell.split(",")) for cell in text.split(";") if cell]
