"""The PyTorch absorbed op against two independent float64 oracles."""

from __future__ import annotations

import pytest
import torch

from conftest import case_seed, rel_err
from mla_patch import mla_decode, mla_decode_ref


def _inputs(B, S, H, R, P, T, seed, dtype=torch.float64, packed=False):
    g = torch.Generator().manual_seed(seed)
    q_latent = torch.randn(B, S, H, R, generator=g, dtype=torch.float64) / R**0.25
    q_pe = torch.randn(B, S, H, P, generator=g, dtype=torch.float64) / P**0.25
    if packed:  # the LatentCache layout: one [c_kv | k_pe] row per token
        buf = torch.randn(B, T, R + P, generator=g, dtype=torch.float64)
        c_kv, k_pe = buf[..., :R], buf[..., R:]
    else:
        c_kv = torch.randn(B, T, R, generator=g, dtype=torch.float64)
        k_pe = torch.randn(B, T, P, generator=g, dtype=torch.float64)
    ends = torch.randint(1, T + 1, (B,), generator=g)
    starts = (torch.rand(B, generator=g) * ends.double() * 0.5).long()
    return [t.to(dtype) for t in (q_latent, q_pe, c_kv, k_pe)] + [starts.int(), ends.int()]


def _attention_oracle(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, scale):
    """Plain per-sequence, per-token loops: softmax over the visible rows only."""
    B, S, H, R = q_latent.shape
    out = torch.zeros(B, S, H, R, dtype=torch.float64)
    lse = torch.full((B, S, H), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            lo, hi = int(kv_start[b]), int(kv_end[b]) - (S - 1 - s)
            if hi <= lo:
                continue
            scores = (q_latent[b, s] @ c_kv[b, lo:hi].T + q_pe[b, s] @ k_pe[b, lo:hi].T) * scale  # [H, n]
            lse[b, s] = torch.logsumexp(scores, dim=-1)
            out[b, s] = torch.softmax(scores, dim=-1) @ c_kv[b, lo:hi]
    return out, lse


@pytest.mark.parametrize("B,S,H,R,P,T", [(1, 1, 1, 8, 4, 1), (3, 1, 4, 32, 8, 17), (2, 3, 5, 16, 8, 40), (4, 2, 16, 64, 16, 129)])
@pytest.mark.parametrize("packed", [False, True])
def test_reference_matches_loop_oracle(B, S, H, R, P, T, packed):
    seed = case_seed("ref", B, S, H, R, P, T, packed)
    args = _inputs(B, S, H, R, P, T, seed, packed=packed)
    scale = 0.37
    out, lse = mla_decode_ref(*args, scale)
    want_out, want_lse = _attention_oracle(*args, scale)
    assert rel_err(out, want_out) < 1e-12, f"seed {seed}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"seed {seed}"
    assert torch.allclose(lse[finite], want_lse[finite], rtol=1e-12), f"seed {seed}"


def test_absorbed_equals_expanded_attention():
    """Absorption algebra apart from any kernel: expand the latent into per-head K/V and attend."""
    seed = case_seed("algebra")
    g = torch.Generator().manual_seed(seed)
    B, S, H, R, P, nope, v, T = 2, 1, 4, 32, 8, 16, 12, 23
    w_kv_b = torch.randn(H * (nope + v), R, generator=g, dtype=torch.float64) / R**0.5
    per_head = w_kv_b.view(H, nope + v, R)
    w_uk, w_uv = per_head[:, :nope], per_head[:, nope:]
    q_nope = torch.randn(B, S, H, nope, generator=g, dtype=torch.float64)
    q_pe = torch.randn(B, S, H, P, generator=g, dtype=torch.float64)
    c_kv = torch.randn(B, T, R, generator=g, dtype=torch.float64)
    k_pe = torch.randn(B, T, P, generator=g, dtype=torch.float64)
    scale = (nope + P) ** -0.5
    # Expanded (vanilla) attention.
    k_nope = torch.einsum("hdr,btr->bhtd", w_uk, c_kv)
    values = torch.einsum("hdr,btr->bhtd", w_uv, c_kv)
    keys = torch.cat([k_nope, k_pe[:, None].expand(B, H, T, P)], dim=-1)
    query = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, nope+P]
    expanded = torch.softmax(query @ keys.transpose(-1, -2) * scale, dim=-1) @ values  # [B, H, S, v]
    # Absorbed.
    q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
    ends = torch.full((B,), T, dtype=torch.int32)
    out_latent, _ = mla_decode_ref(q_latent, q_pe, c_kv, k_pe, torch.zeros(B, dtype=torch.int32), ends, scale)
    absorbed = torch.einsum("bshr,hvr->bhsv", out_latent, w_uv)
    assert rel_err(absorbed, expanded) < 1e-12, f"seed {seed}"


def test_rows_outside_ranges_are_never_read():
    seed = case_seed("nan-poison")
    args = _inputs(3, 2, 4, 16, 8, 30, seed)
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = args
    rows = torch.arange(30)
    outside = (rows[None] < kv_start[:, None].long()) | (rows[None] >= kv_end[:, None].long())
    c_kv = c_kv.masked_fill(outside[..., None], float("nan"))
    k_pe = k_pe.masked_fill(outside[..., None], float("nan"))
    out, lse = mla_decode_ref(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, 0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_empty_range_gives_zero_and_minus_inf():
    args = _inputs(2, 1, 3, 8, 4, 5, case_seed("empty"))
    kv_start = torch.tensor([2, 0], dtype=torch.int32)
    kv_end = torch.tensor([2, 5], dtype=torch.int32)
    out, lse = mla_decode_ref(*args[:4], kv_start, kv_end, 1.0)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    seed = case_seed("lowp", str(dtype))
    args = _inputs(2, 1, 8, 64, 16, 300, seed)
    rounded = [t.to(dtype) for t in args[:4]]
    out, lse = mla_decode(*rounded, *args[4:], 0.2, backend="torch")
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, _ = mla_decode_ref(*[t.double() for t in rounded], *args[4:], 0.2)
    budget = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(out, ref) < budget, f"seed {seed}"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(1, a[1][..., :3]), "q_pe"),
        (lambda a: a.__setitem__(2, a[2].float()), "dtype"),
        (lambda a: a.__setitem__(3, a[3][:, :-1]), "k_pe"),
        (lambda a: a.__setitem__(4, a[4].float()), "kv_start"),
        (lambda a: a.__setitem__(2, a[2][0]), "c_kv"),
    ],
)
def test_bad_arguments_name_the_problem(change, message):
    args = _inputs(2, 1, 4, 16, 8, 10, case_seed("bad"))
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        mla_decode(*args, 1.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_one_contract_for_empty_clamped_and_bad_inputs(device):
    """The same answers from the reference (CPU) and the kernel (CUDA): ranges clamped to the rows there
    are, an empty range or cache gives zeros and lse -inf, a non-finite scale is refused."""
    import mla_patch

    if device == "cuda" and not (torch.cuda.is_available() and mla_patch.ops.has_kernel()):
        pytest.skip("needs CUDA and the built extension")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(7)
    B, S, H, R, P, T = 3, 1, 16, 512, 64, 40
    q, qp = torch.randn(B, S, H, R, generator=g), torch.randn(B, S, H, P, generator=g)
    c, k = torch.randn(B, T, R, generator=g), torch.randn(B, T, P, generator=g)
    to = dict(device=device, dtype=dtype)
    q, qp, c, k = q.to(**to), qp.to(**to), c.to(**to), k.to(**to)
    ints = dict(dtype=torch.int32, device=device)
    starts, ends = torch.tensor([-5, 10, 30], **ints), torch.tensor([25, 99, 12], **ints)
    out, lse = mla_patch.mla_decode(q, qp, c, k, starts, ends, 0.1)
    want, want_lse = mla_patch.mla_decode(q, qp, c, k, torch.tensor([0, 10, 30], **ints),
                                          torch.tensor([25, 40, 30], **ints), 0.1)
    # Clamped: the in-range call's answer (to the last bit on the CPU; a kernel may split the work otherwise).
    assert torch.allclose(out.float(), want.float(), rtol=1e-2 if device == "cuda" else 0, atol=0)
    assert torch.allclose(lse[:2], want_lse[:2], rtol=1e-4 if device == "cuda" else 0, atol=0)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))  # start past end: empty
    empty_out, empty_lse = mla_patch.mla_decode(q, qp, c[:, :0], k[:, :0], torch.zeros(B, **ints),
                                                torch.zeros(B, **ints), 0.1)
    assert torch.all(empty_out == 0) and torch.all(empty_lse == float("-inf"))
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sm_scale must be a finite number"):
            mla_patch.mla_decode(q, qp, c, k, starts, ends, scale)
