"""The CUDA kernels of the decode op against the float64 reference, and the dispatch that picks them.

What ships: `torch.ops.mla_patch.mla_decode`, whose dispatch (csrc/dispatch.h) runs one of three kernels: "mma"
(the portable mma.sync kernel), "seesaw" (sm_90a wgmma, 64 query rows a CTA; its late order where S*H <= 32) and
"narrow" (sm_90a, R = 512 and S*H <= 16). The default dispatch is tested through the public op (sweeps, tile
edges, long contexts, CUDA graphs, torch.compile, bad inputs) and against a literal table of its rules. Each kernel
is also forced through `mla_patch.kernel_probe.decode_forced`, which reports what ran (`Ran`): every kernel on
ragged lengths, tile and split edges, forced split counts, growing scores, strided queries and fp16 at its range
edge, with its tiles by TMA and by cp.async (tma=False), whose outputs must be the same bits; forcing a kernel or a
split count that cannot serve raises; the per-CTA timeline stamps of one call.

Skipped (with the reason) without a GPU or without the built extension; the sm_90a kernels need compute capability
9.0. Inputs are drawn fresh per case from a seed mixed from MLA_PATCH_SEED and the case parameters (printed on
failure), rounded to the kernel dtype, and the same rounded values are upcast to float64 for the oracle. Cache rows
outside each sequence's visible range are NaN, and the caching allocator is primed with NaN blocks of the outputs'
sizes, so an out-of-range read or a missed write shows as NaN. Observed errors go to the file named by
MLA_PATCH_KERNEL_ERRLOG (one JSON line per case).
"""

from __future__ import annotations

import json
import math
import os
import zlib

import pytest
import torch

from mla_patch import kernel_probe, ops
from mla_patch.reference import mla_decode_ref

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not ops.has_kernel():
    pytest.skip(f"extension not available: {ops.extension_error()}", allow_module_level=True)

BASE_SEED = int(os.environ.get("MLA_PATCH_SEED", "1234"))
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# The kernel's error may be at most this multiple of the reference's own error in the kernel
# dtype (float32 math on the same inputs, output rounded once), plus a small floor.
REF_RATIO = 2.0
LSE_ATOL = 2e-3
DIMS = [(512, 64), (256, 32)]
SM_SCALE = 192**-0.5
DEV = "cuda"
IS_SM90 = torch.cuda.get_device_capability() == (9, 0)
# Lengths around the 32- and 64-row tiles and pairs of 64-row tiles, with an empty sequence (a 4096-row capacity).
TILE_EDGE_LENS = [1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 191, 192, 193, 255, 256, 257,
                  1000, 4095, 4096, 0]


def _seed(*params) -> int:
    return (BASE_SEED * 1_000_003 + zlib.crc32(repr(params).encode())) % (2**31)


def _log(record: dict) -> None:
    path = os.environ.get("MLA_PATCH_KERNEL_ERRLOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _ceil_div(a, b):
    return -(-a // b)


def make_case(B, S, H, R, P, T, lens, dtype, layout, seed, pads=None):
    """Random rounded inputs; rows outside [kv_start, kv_end) are NaN. lens[b] = kv_end - kv_start."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q_latent = torch.randn(B, S, H, R, generator=g, device=DEV).to(dtype)
    q_pe = torch.randn(B, S, H, P, generator=g, device=DEV).to(dtype)
    if layout == "packed":  # the latent cache's one-row-per-token buffer
        buf = torch.randn(B, T, R + P, generator=g, device=DEV).to(dtype)
        c_kv, k_pe = buf[..., :R], buf[..., R:]
    else:  # transformers' own caches: two contiguous tensors
        c_kv = torch.randn(B, T, R, generator=g, device=DEV).to(dtype)
        k_pe = torch.randn(B, T, P, generator=g, device=DEV).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int64)
    if pads is None:
        pads = [int(torch.randint(0, T - int(n) + 1, (1,)).item()) if T > n else 0 for n in lens]
    kv_start = torch.tensor(pads, dtype=torch.int32, device=DEV)
    kv_end = (kv_start.long() + lens.to(DEV)).to(torch.int32)
    rows = torch.arange(T, device=DEV)
    outside = (rows[None, :] < kv_start[:, None]) | (rows[None, :] >= kv_end[:, None])
    c_kv.masked_fill_(outside[..., None], float("nan"))
    k_pe.masked_fill_(outside[..., None], float("nan"))
    return q_latent, q_pe, c_kv, k_pe, kv_start, kv_end


def _prime_allocator_with_nan(q_latent):
    """Free NaN-filled blocks of the outputs' sizes so the op's empty() likely reuses them."""
    B, S, H, R = q_latent.shape
    blocks = [torch.full(shape, float("nan"), dtype=dt, device=DEV)
              for shape, dt in (((B, S, H, R), q_latent.dtype), ((B, S, H), torch.float32))]
    del blocks


def run_kernel(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale=SM_SCALE):
    """The public op: the default dispatch."""
    _prime_allocator_with_nan(q_latent)
    out, lse = torch.ops.mla_patch.mla_decode(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale)
    torch.cuda.synchronize()
    return out, lse


def run_forced(inputs, kernel, sm_scale=SM_SCALE, **kw):
    """decode_forced (kernel, splits, tma, timeline as given); returns (out, lse, Ran)."""
    _prime_allocator_with_nan(inputs[0])
    out, lse, ran = kernel_probe.decode_forced(*inputs, sm_scale, kernel=kernel, **kw)
    torch.cuda.synchronize()
    return out, lse, ran


def _rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_outputs(inputs, out, lse, tag, sm_scale=SM_SCALE):
    """out and lse against the float64 reference on the same (rounded) inputs: NaN never passes."""
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = inputs
    dtype = q_latent.dtype
    ref, ref_lse = mla_decode_ref(
        q_latent.double(), q_pe.double(), c_kv.double(), k_pe.double(), kv_start, kv_end, sm_scale
    )
    ref_lowp, _ = mla_decode_ref(*inputs, sm_scale)
    assert out.shape == ref.shape and out.dtype == dtype and lse.dtype == torch.float32, tag
    assert not torch.isnan(out).any(), f"{tag}: NaN in out (unwritten element or out-of-range read)"
    assert not torch.isnan(lse).any(), f"{tag}: NaN in lse"
    err = _rel(out, ref)
    err_ref = _rel(ref_lowp, ref)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all(), f"{tag}: lse -inf pattern differs"
    assert (out[empty] == 0).all(), f"{tag}: a query that sees no row must give zeros"
    lse_err = (lse[~empty].double() - ref_lse[~empty]).abs().max().item() if (~empty).any() else 0.0
    _log({"case": tag, "dtype": str(dtype).replace("torch.", ""), "rel_err": err, "ref_rel_err": err_ref,
          "lse_abs_err": lse_err})
    assert err < REL_TOL[dtype], f"{tag}: rel err {err:.3e} >= {REL_TOL[dtype]:.0e} (reference in {dtype}: {err_ref:.3e})"
    assert err <= REF_RATIO * err_ref + 1e-4, f"{tag}: rel err {err:.3e} > {REF_RATIO} x reference's {err_ref:.3e}"
    assert lse_err < LSE_ATOL, f"{tag}: lse abs err {lse_err:.3e}"
    return err, err_ref


def check_case(inputs, tag, sm_scale=SM_SCALE):
    """The public op (default dispatch) against the float64 reference."""
    out, lse = run_kernel(*inputs, sm_scale=sm_scale)
    return check_outputs(inputs, out, lse, tag, sm_scale)


def _skip_unless_sm90(kernel):
    if kernel in ("seesaw", "narrow") and not IS_SM90:
        pytest.skip(f"the {kernel} kernel needs compute capability 9.0")


def _tma_expected(kernel, S, H, R, P, tma):
    """(q_tma, kv_tma) the rules give (TMA only with tma=True on compute capability 9.0): mma both where every block
    is 128-byte rows (R = 512, P = 64) and each M tile is heads of one token; seesaw its query where R = 512 and H is
    a multiple of its 64-row tile, its cache where R = 512; narrow its cache always, its query never."""
    if not (tma and IS_SM90):
        return False, False
    if kernel == "mma":
        m = 16 if S * H <= 16 else 32
        serves = R == 512 and P == 64 and (S == 1 or H % m == 0)
        return serves, serves
    if kernel == "seesaw":
        return R == 512 and H % 64 == 0, R == 512
    return False, True


def check_forced(kernel, inputs, tag, *, splits=0, tma=True, sm_scale=SM_SCALE):
    """`kernel` forced (splits, tma as given) against the float64 reference; asserts it ran with the split count and
    the TMA copies expected. Returns (out, lse, Ran)."""
    _skip_unless_sm90(kernel)
    tag = f"{kernel} tma={tma} splits={splits} {tag}"
    out, lse, ran = run_forced(inputs, kernel, sm_scale=sm_scale, splits=splits, tma=tma)
    _, S, H, R = inputs[0].shape
    assert ran.kernel == kernel, f"{tag}: ran {ran}"
    if splits:
        assert ran.splits == splits, f"{tag}: ran {ran}"
    else:  # the heuristic's count (test_split_heuristic_spec)
        assert 1 <= ran.splits <= 128, f"{tag}: ran {ran}"
    want = _tma_expected(kernel, S, H, R, inputs[1].shape[-1], tma)
    assert (ran.q_tma, ran.kv_tma) == want, f"{tag}: ran {ran}, expected (q_tma, kv_tma) = {want}"
    check_outputs(inputs, out, lse, tag, sm_scale)
    return out, lse, ran


def growing_case(S, H, dtype, seed):
    """make_case for two sequences (3000 and 1234 rows of a 3000-row separate cache) whose rows are scaled by a ramp
    from 0.2 to 4.0 along the cache: the scores grow, so the running max jumps many times (the rescale path)."""
    T = 3000
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = make_case(2, S, H, 512, 64, T, [3000, 1234], dtype, "separate", seed)
    ramp = torch.linspace(0.2, 4.0, T, device=DEV)[None, :, None]
    return q_latent, q_pe, (c_kv.float() * ramp).to(dtype), (k_pe.float() * ramp).to(dtype), kv_start, kv_end


def one_buffer_queries(q_latent, q_pe):
    """q_latent and q_pe as views of one [B, S, H, R + P] buffer (strided, not contiguous)."""
    qbuf = torch.cat([q_latent, q_pe], dim=-1)
    R = q_latent.shape[-1]
    return qbuf[..., :R], qbuf[..., R:]


def strided_case(S, H, seed):
    """Three sequences (700, 3 and 450 rows of a 700-row packed cache), bf16, their queries one_buffer_queries."""
    q_latent, q_pe, *cache = make_case(3, S, H, 512, 64, 700, [700, 3, 450], torch.bfloat16, "packed", seed)
    return (*one_buffer_queries(q_latent, q_pe), *cache)


def _ragged_lens(seed):
    """A random capacity T in [200, 1500) and lengths 1, 0 (empty), 33 (a non-multiple of the tile), random, T."""
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(200, 1500, (1,), generator=g).item())
    return T, [1, 0, 33, int(torch.randint(2, T, (1,), generator=g).item()), T]


# ---- The default dispatch, through the public op.
@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [1, 2, 4])
@pytest.mark.parametrize("H", [1, 16, 40, 128])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"R{d[0]}P{d[1]}")
def test_sweep(dims, H, S, dtype, layout):
    """Ragged lengths: 1, 0 (empty), a non-multiple of the tile, random, the full capacity."""
    R, P = dims
    seed = _seed("sweep", dims, H, S, str(dtype), layout)
    T, lens = _ragged_lens(seed)
    tag = f"sweep R={R} P={P} H={H} S={S} {dtype} {layout} T={T} lens={lens} seed={seed}"
    check_case(make_case(len(lens), S, H, R, P, T, lens, dtype, layout, seed), tag)


@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"R{d[0]}P{d[1]}")
@pytest.mark.parametrize("H", [16, 128])
def test_tile_edges_and_batch(dims, H):
    """Many sequences with lengths around the 32-row tile and the split boundaries."""
    R, P = dims
    seed = _seed("edges", dims, H)
    lens = [1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4095, 4096, 0]
    tag = f"edges R={R} H={H} lens={lens} seed={seed}"
    check_case(make_case(len(lens), 1, H, R, P, 4096, lens, torch.bfloat16, "packed", seed), tag)


@pytest.mark.parametrize("H", [16, 128])
def test_short_sequences_in_long_buffer(H):
    """Capacity far above the lengths: most split chunks are empty and must exit cleanly."""
    seed = _seed("sparse", H)
    lens = [5, 100, 0, 37]
    tag = f"sparse H={H} lens={lens} seed={seed}"
    check_case(make_case(4, 2, H, 512, 64, 32768, lens, torch.bfloat16, "packed", seed), tag)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_growing_scores(dtype):
    """Scores that grow along the cache: the running max jumps many times (rescale path)."""
    seed = _seed("growing", str(dtype))
    check_case(growing_case(2, 40, dtype, seed), f"growing {dtype} seed={seed}")


def test_strided_queries():
    """q_latent and q_pe as views of one [B, S, H, R+P] buffer (strides, not contiguity)."""
    seed = _seed("strided")
    inputs = strided_case(2, 16, seed)
    assert not inputs[0].is_contiguous()
    check_case(inputs, f"strided seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("S", [1, 2])
def test_long_context(H, S):
    """128K tokens at batch 1 (all splits busy) and a ragged batch of long sequences."""
    seed = _seed("long", H, S)
    T = 131072
    check_case(make_case(1, S, H, 512, 64, T, [T], torch.bfloat16, "packed", seed), f"long B=1 H={H} S={S} seed={seed}")
    lens = [T - 17, 65537, 1]
    check_case(
        make_case(3, S, H, 512, 64, T, lens, torch.bfloat16, "separate", seed + 1),
        f"long B=3 H={H} S={S} lens={lens} seed={seed + 1}",
    )


# ---- The default dispatch's choice, as a table written from its rules (csrc/dispatch.h), rows = B x capacity T:
# off compute capability 9.0, mma; R = 512, P = 64, S*H <= 16: narrow from 128K rows; S*H < 64: seesaw from 128K
# rows at R = 512, 256K at R = 256; S*H >= 64: seesaw from 4K rows at R = 512 with H % 64 == 0, else from 16K;
# below each threshold, mma. (B, S, H, R, P, T) -> the kernel on an H200-like device.
DISPATCH_SPEC = [  # each line: a case at or above a threshold, then one below it
    # R = 512, P = 64, S*H <= 16
    ((1, 1, 16, 512, 64, 131072), "narrow"), ((1, 1, 16, 512, 64, 131071), "mma"),
    ((128, 1, 16, 512, 64, 1024), "narrow"), ((127, 1, 16, 512, 64, 1032), "mma"),  # 131,064 rows
    ((1, 1, 1, 512, 64, 131072), "narrow"), ((64, 1, 16, 512, 64, 1024), "mma"),
    ((8, 2, 8, 512, 64, 16384), "narrow"), ((4, 2, 8, 512, 64, 16384), "mma"),
    # S*H < 64 otherwise (R = 256 is never narrow)
    ((1, 1, 17, 512, 64, 131072), "seesaw"), ((1, 1, 16, 512, 64, 4096), "mma"),
    ((1, 1, 32, 512, 64, 131072), "seesaw"), ((1, 1, 32, 512, 64, 131071), "mma"),
    ((1, 2, 16, 512, 64, 131072), "seesaw"), ((1, 2, 16, 512, 64, 65536), "mma"),
    ((2, 1, 40, 512, 64, 65536), "seesaw"), ((1, 1, 40, 512, 64, 65536), "mma"),
    ((1, 1, 63, 512, 64, 131072), "seesaw"), ((1, 1, 63, 512, 64, 65536), "mma"),
    ((1, 1, 16, 256, 32, 262144), "seesaw"), ((1, 1, 16, 256, 32, 262143), "mma"),
    ((2, 1, 40, 256, 32, 131072), "seesaw"), ((1, 1, 63, 256, 32, 131072), "mma"),
    # S*H >= 64: from 4K rows at R = 512 with H % 64 == 0, else from 16K
    ((1, 1, 128, 512, 64, 4096), "seesaw"), ((1, 1, 128, 512, 64, 4095), "mma"),
    ((4, 1, 128, 512, 64, 1024), "seesaw"), ((1, 1, 128, 512, 64, 1024), "mma"),
    ((1, 1, 64, 512, 64, 4096), "seesaw"), ((1, 1, 64, 512, 64, 4095), "mma"),
    ((2, 2, 64, 512, 64, 2048), "seesaw"), ((1, 2, 64, 512, 64, 2047), "mma"),
    ((1, 1, 192, 512, 64, 4096), "seesaw"), ((1, 1, 80, 512, 64, 4096), "mma"),
    ((1, 1, 80, 512, 64, 16384), "seesaw"), ((1, 1, 80, 512, 64, 16383), "mma"),
    ((1, 2, 32, 512, 64, 16384), "seesaw"), ((1, 2, 32, 512, 64, 16383), "mma"),  # S*H = 64 of 32 heads
    ((1, 1, 128, 256, 32, 16384), "seesaw"), ((1, 1, 128, 256, 32, 16383), "mma"),
    ((1, 1, 64, 256, 32, 16384), "seesaw"), ((1, 1, 128, 256, 32, 8192), "mma"),
]


def _spec_id(shape):
    B, S, H, R, _, T = shape
    return f"B{B}-S{S}-H{H}-R{R}-T{T}"


def _auto_case(shape, tag):
    """decode_forced(kernel="auto") on short ragged sequences in a capacity-T cache (the dispatch reads only the
    shapes), checked against float64; returns Ran."""
    B, S, H, R, P, T = shape
    seed = _seed(tag, shape)
    lens = [min(T, 100 + 37 * b) for b in range(B)]
    inputs = make_case(B, S, H, R, P, T, lens, torch.bfloat16, "packed", seed)
    out, lse, ran = run_forced(inputs, "auto")
    check_outputs(inputs, out, lse, f"{tag} {_spec_id(shape)} seed={seed} ran {ran}")
    return ran


@pytest.mark.parametrize("shape, want", DISPATCH_SPEC, ids=[_spec_id(s) for s, _ in DISPATCH_SPEC])
def test_default_dispatch_spec(shape, want):
    if not IS_SM90:
        pytest.skip("the table is the dispatch on compute capability 9.0")
    ran = _auto_case(shape, "dispatch")
    assert ran.kernel == want, f"{_spec_id(shape)}: the default dispatch ran {ran.kernel}, the rules say {want}"


def test_default_dispatch_off_hopper():
    """Off compute capability 9.0 every shape runs the mma kernel, and forcing an sm_90a kernel raises."""
    if IS_SM90:
        pytest.skip("compute capability 9.0: test_default_dispatch_spec")
    for shape in ((1, 1, 128, 512, 64, 4096), (128, 1, 16, 512, 64, 1024), (2, 1, 40, 256, 32, 131072)):
        assert _auto_case(shape, "dispatch-off-sm90").kernel == "mma", shape
    inputs = make_case(1, 1, 16, 512, 64, 300, [300], torch.bfloat16, "packed", _seed("off-sm90"))
    for kernel in ("seesaw", "narrow"):
        with pytest.raises(RuntimeError, match=kernel):
            run_forced(inputs, kernel)
    torch.cuda.synchronize()


# (kernel, B, S, H, R, P, T) -> the split count of the heuristic (csrc/dispatch.h) on a 132-SM H200: mma's
# mma_num_splits, seesaw's and narrow's seesaw_num_splits.
SPLITS_SPEC = [
    (("mma", 1, 1, 16, 512, 64, 4096), 64),
    (("mma", 1, 1, 16, 512, 64, 1024), 32),
    (("mma", 1, 1, 16, 512, 64, 300), 10),
    (("mma", 1, 1, 128, 512, 64, 1024), 32),
    (("mma", 4, 1, 128, 512, 64, 4096), 8),
    (("mma", 64, 1, 128, 512, 64, 1024), 1),
    (("seesaw", 1, 1, 16, 512, 64, 4096), 32),
    (("seesaw", 1, 1, 128, 512, 64, 4096), 32),
    (("seesaw", 1, 1, 128, 512, 64, 16384), 64),  # 66 trimmed to the 64 chunks of whole pairs that are filled
    (("seesaw", 4, 1, 128, 512, 64, 1024), 8),
    (("narrow", 1, 1, 16, 512, 64, 4096), 32),
    (("narrow", 1, 1, 16, 512, 64, 131072), 128),
    (("narrow", 128, 1, 16, 512, 64, 1024), 1),
]


@pytest.mark.parametrize("case, want", SPLITS_SPEC, ids=[f"{c[0]}-{_spec_id(c[1:])}" for c, _ in SPLITS_SPEC])
def test_split_heuristic_spec(case, want):
    """splits=0 runs the heuristic's count, which Ran reports."""
    kernel, *shape = case
    _skip_unless_sm90(kernel)
    if torch.cuda.get_device_properties(0).multi_processor_count != 132:
        pytest.skip("the table is the heuristic on 132 SMs")
    B, S, H, R, P, T = shape
    seed = _seed("split-spec", case)
    inputs = make_case(B, S, H, R, P, T, [min(T, 100 + 37 * b) for b in range(B)], torch.bfloat16, "packed", seed)
    ran = check_forced(kernel, inputs, f"heuristic {_spec_id(shape)} seed={seed}")[2]
    assert ran.splits == want, f"{case}: {ran.splits} splits, the heuristic gives {want}"


# (kernel, S, H, R) -> (q_tma, kv_tma) with tma=True on compute capability 9.0; tma=False is (False, False).
TMA_SPEC = [
    (("mma", 1, 16, 512), (True, True)),
    (("mma", 1, 1, 512), (True, True)),
    (("mma", 1, 40, 512), (True, True)),  # one token: any H
    (("mma", 1, 128, 512), (True, True)),
    (("mma", 2, 32, 512), (True, True)),  # 32-row M tiles of one token each
    (("mma", 2, 16, 512), (False, False)),  # a 32-row M tile across two tokens
    (("mma", 2, 8, 512), (False, False)),  # a 16-row M tile across two tokens
    (("mma", 3, 16, 512), (False, False)),
    (("mma", 1, 128, 256), (False, False)),  # 64-byte rope rows
    (("seesaw", 1, 128, 512), (True, True)),
    (("seesaw", 2, 64, 512), (True, True)),
    (("seesaw", 1, 192, 512), (True, True)),
    (("seesaw", 1, 16, 512), (False, True)),
    (("seesaw", 1, 40, 512), (False, True)),
    (("seesaw", 2, 32, 512), (False, True)),
    (("seesaw", 1, 128, 256), (False, False)),
    (("seesaw", 1, 16, 256), (False, False)),
    (("narrow", 1, 16, 512), (False, True)),
    (("narrow", 2, 8, 512), (False, True)),
]


@pytest.mark.parametrize("case, want", TMA_SPEC, ids=[f"{k}-S{s}-H{h}-R{r}" for (k, s, h, r), _ in TMA_SPEC])
def test_tma_spec(case, want):
    kernel, S, H, R = case
    if not IS_SM90:
        pytest.skip("TMA copies need compute capability 9.0")
    P = 64 if R == 512 else 32
    seed = _seed("tma-spec", case)
    inputs = make_case(2, S, H, R, P, 300, [300, 77], torch.bfloat16, "packed", seed)
    for tma in (True, False) if kernel != "narrow" else (True,):
        _, _, ran = run_forced(inputs, kernel, tma=tma)
        got = (ran.q_tma, ran.kv_tma)
        assert got == (want if tma else (False, False)), f"{case} tma={tma}: ran {ran}"


# ---- Forcing what cannot serve.
@pytest.mark.parametrize(
    "kernel, S, H, R, tma",
    [("narrow", 1, 32, 512, True), ("narrow", 1, 17, 512, True), ("narrow", 2, 16, 512, True),
     ("narrow", 1, 16, 256, True), ("narrow", 1, 16, 512, False)],
    ids=["narrow-SH32", "narrow-SH17", "narrow-S2H16", "narrow-R256", "narrow-cpasync"],
)
def test_forced_kernel_that_cannot_serve_raises(kernel, S, H, R, tma):
    """A forced kernel never silently hands the call to another: the error names it; the context stays healthy."""
    _skip_unless_sm90(kernel)
    P = 64 if R == 512 else 32
    inputs = make_case(2, S, H, R, P, 300, [300, 5], torch.bfloat16, "packed", _seed("cannot", kernel, S, H, R))
    with pytest.raises(RuntimeError, match=kernel):
        run_forced(inputs, kernel, tma=tma)
    torch.cuda.synchronize()


@pytest.mark.parametrize("kernel", ["auto", "mma"])
def test_splits_out_of_range_raise(kernel):
    """splits is 0 (the heuristic) or 1..128; 129 and -1 raise, 128 runs 128."""
    inputs = make_case(2, 1, 16, 512, 64, 300, [300, 5], torch.bfloat16, "packed", _seed("splits-range", kernel))
    for bad in (129, -1):
        with pytest.raises(RuntimeError, match="split"):
            run_forced(inputs, kernel, splits=bad)
    torch.cuda.synchronize()
    out, lse, ran = run_forced(inputs, kernel, splits=128)
    assert ran.splits == 128
    check_outputs(inputs, out, lse, f"{kernel} splits=128 ran {ran}")


# ---- Each kernel forced: "mma" and "seesaw" with their tiles by TMA where the rules allow, "-cpasync" with
# tma=False (every tile by cp.async, the path where tensor maps do not encode); "narrow" (R = 512, S*H <= 16) has
# tests of its own below. Seesaw runs its late order where S*H <= 32 (H = 16 at S = 1, 2).
PATHS = {"mma": ("mma", True), "mma-cpasync": ("mma", False), "seesaw": ("seesaw", True),
         "seesaw-cpasync": ("seesaw", False)}


def _check_path(path, inputs, tag, **kw):
    kernel, tma = PATHS.get(path, (path, True))
    if path == "mma-cpasync" and not IS_SM90:
        pytest.skip("off compute capability 9.0 the mma kernel copies by cp.async anyway (the 'mma' case)")
    return check_forced(kernel, inputs, tag, tma=tma, **kw)


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("H", [16, 40, 64, 128])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"R{d[0]}P{d[1]}")
@pytest.mark.parametrize("path", PATHS)
def test_paths_sweep(path, dims, H, S, dtype, layout):
    """Ragged lengths: 1, 0, 33, random, the full capacity."""
    R, P = dims
    seed = _seed("paths", dims, H, S, str(dtype), layout)
    T, lens = _ragged_lens(seed)
    tag = f"R={R} P={P} H={H} S={S} {dtype} {layout} T={T} lens={lens} seed={seed}"
    _check_path(path, make_case(len(lens), S, H, R, P, T, lens, dtype, layout, seed), tag)


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("H, S", [(16, 1), (64, 1), (128, 1), (128, 2), (40, 2)])
@pytest.mark.parametrize("path", PATHS)
def test_paths_tile_edges(path, H, S, layout):
    """Lengths around the 32- and 64-row tiles, pairs of tiles and split boundaries, a batch large enough for
    no split too."""
    seed = _seed("paths-edges", H, S, layout)
    lens = TILE_EDGE_LENS
    tag = f"edges H={H} S={S} {layout} lens={lens} seed={seed}"
    _check_path(path, make_case(len(lens), S, H, 512, 64, 4096, lens, torch.bfloat16, layout, seed), tag)


@pytest.mark.parametrize("H", [16, 64, 128])
@pytest.mark.parametrize("path", PATHS)
def test_paths_batch_one(path, H):
    """Batch 1 (many splits, the combine) at a few lengths, and short sequences in a long buffer."""
    for L in (1, 31, 32, 33, 64, 65, 128, 129, 1000, 4096):
        seed = _seed("paths-b1", H, L)
        _check_path(path, make_case(1, 1, H, 512, 64, 4096, [L], torch.bfloat16, "packed", seed), f"B=1 H={H} L={L} seed={seed}")
    seed = _seed("paths-sparse", H)
    lens = [5, 100, 0, 37]
    _check_path(path, make_case(4, 2, H, 512, 64, 32768, lens, torch.bfloat16, "packed", seed), f"sparse H={H} lens={lens} seed={seed}")


@pytest.mark.parametrize(
    "H, S, B, T, dtype",
    [(128, 1, 300, 600, torch.bfloat16), (128, 2, 64, 2000, torch.float16), (16, 1, 1000, 300, torch.bfloat16),
     (40, 1, 200, 900, torch.float16), (16, 1, 1024, 64, torch.bfloat16)],
)
@pytest.mark.parametrize("path", ["mma", "seesaw"])
def test_paths_many_short_sequences(path, H, S, B, T, dtype):
    """Large batches of short ragged sequences (empty ones among them): a grid of many CTAs along the batch."""
    seed = _seed("many", H, S, B, T, str(dtype))
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lens[0], lens[1], lens[-1] = 0, 1, T
    inputs = make_case(B, S, H, 512, 64, T, lens, dtype, "packed", seed)
    _check_path(path, inputs, f"many H={H} S={S} B={B} T={T} {dtype} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", PATHS)
def test_paths_growing_scores(path, dtype):
    """The running max jumps many times (rescale path), 128 heads, two new tokens."""
    seed = _seed("paths-growing", str(dtype))
    _check_path(path, growing_case(2, 128, dtype, seed), f"growing {dtype} seed={seed}")


def test_paths_strided_queries():
    """Queries as views of one [B, S, H, R+P] buffer through the seesaw kernel (its query by TMA)."""
    seed = _seed("paths-strided")
    _check_path("seesaw", strided_case(1, 128, seed), f"strided seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("S", [2])
@pytest.mark.parametrize("path", PATHS)
def test_paths_long_context(path, S):
    """128K tokens at batch 1 and a ragged batch of long sequences, 128 heads (test_long_context runs
    the default dispatch at S = 1 and 2)."""
    seed = _seed("paths-long", S)
    T = 131072
    _check_path(path, make_case(1, S, 128, 512, 64, T, [T], torch.bfloat16, "packed", seed), f"long B=1 S={S} seed={seed}")
    lens = [T - 17, 65537, 1]
    _check_path(path, make_case(3, S, 128, 512, 64, T, lens, torch.bfloat16, "separate", seed + 1),
                f"long B=3 S={S} lens={lens} seed={seed + 1}")


def test_paths_agree():
    """The seesaw kernel agrees closely with the mma kernel on one H=128 case (both near float64)."""
    _skip_unless_sm90("seesaw")
    inputs = make_case(4, 1, 128, 512, 64, 2048, [2048, 1, 900, 0], torch.bfloat16, "packed", _seed("agree"))
    out1, lse1, _ = run_forced(inputs, "seesaw")
    out0, lse0, _ = run_forced(inputs, "mma")
    assert _rel(out1, out0) < 1e-2
    torch.testing.assert_close(lse1, lse0, rtol=0, atol=1e-3)


@pytest.mark.parametrize("splits", [1, 2, 3, 4, 7, 8, 12, 64, 128])
@pytest.mark.parametrize("path", PATHS)
def test_paths_forced_splits(path, splits):
    """Any split-KV factor: the combine with empty splits (a 1-row sequence cut 128 ways), uneven chunks, one split
    (no combine); batch 1 with two tokens, 40 heads, R = 256, fp16 (few combine rows: the column-chunked combine);
    135 rows of R = 256 (several rows a combine block, the last one partly empty)."""
    seed = _seed("paths-splits", splits)
    lens = [4000, 1, 777]
    inputs = make_case(3, 1, 128, 512, 64, 4096, lens, torch.bfloat16, "packed", seed)
    _check_path(path, inputs, f"lens={lens} seed={seed}", splits=splits)
    seed += 1
    inputs = make_case(1, 2, 40, 256, 32, 3000, [2999], torch.float16, "separate", seed)
    _check_path(path, inputs, f"B=1 S=2 H=40 R=256 fp16 seed={seed}", splits=splits)
    seed += 1  # 135 rows: the combine's last block (2 or 4 rows a block) is partly empty
    inputs = make_case(3, 1, 45, 256, 32, 700, [700, 3, 555], torch.bfloat16, "packed", seed)
    _check_path(path, inputs, f"B=3 H=45 R=256 seed={seed}", splits=splits)


def _fp16_score_rounding_up():
    """An fp16 score x (with a unit query and sm_scale 1) whose probability 2^(x log2 e) against a running max
    of 0 is rounded up by fp16 by at least 4e-4 relative: found by search, as the kernel computes it in fp32."""
    xs = torch.linspace(-4.0, -0.05, 200001).half().unique().float()
    p = torch.exp2(xs * 1.4426950408889634)
    up = p.half().float() / p - 1
    best = int(up.argmax())
    assert up[best] > 4e-4, up.max()
    return xs[best].item()


@pytest.mark.parametrize("splits", [1, 8])
@pytest.mark.parametrize("path", [*PATHS, "narrow"])
def test_paths_fp16_at_range_edge(path, splits):
    """fp16 where the cache holds the largest finite fp16 value, 65504. P is rounded to fp16 for the tensor
    cores and its row sum is not, so a row (output or split partial) can come out a hair above 65504, which
    fp16 rounds to inf unless clamped. Scores are set so that it does: the first row of every 32 rows scores
    0 (the running max), every other row x, whose probability fp16 rounds up by >= 4e-4 (inf from 2.4e-4).
    16 heads at one token: every kernel serves it."""
    seed = _seed("fp16-edge", splits)
    x = _fp16_score_rounding_up()
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = make_case(2, 1, 16, 512, 64, 2048, [2048, 1500], torch.float16,
                                                             "packed", seed)
    visible = ~torch.isnan(k_pe[..., :1])
    q_latent.zero_()
    q_pe.zero_()
    q_pe[..., 0] = 1.0
    # Tiles (32 rows for mma, 64 for seesaw and narrow) start at kv_start.
    rows = torch.arange(k_pe.shape[1], device=DEV)[None, :, None] - kv_start[:, None, None]
    k_pe.copy_(torch.where(visible, torch.zeros_like(k_pe), k_pe))
    k_pe[..., :1] = torch.where(visible & (rows % 32 != 0), torch.full_like(k_pe[..., :1], x), k_pe[..., :1])
    c_kv[..., :8] = torch.where(visible, torch.full_like(c_kv[..., :8], 65504.0), c_kv[..., :8])
    _check_path(path, (q_latent, q_pe, c_kv, k_pe, kv_start, kv_end), f"fp16 range edge seed={seed}",
                splits=splits, sm_scale=1.0)


# ---- TMA and cp.async copies land the same bytes where the products read them: outputs bit-identical.
def _query_layouts_case(S, H, dtype, seed, layout="packed", lens=(2000, 0, 777), T=2000):
    """Sequences over a T-row cache and their queries two ways: two tensors, and views of one [B, S, H, R + P]
    buffer (strided). Returns (the query pairs, (c_kv, k_pe, kv_start, kv_end))."""
    q_latent, q_pe, *cache = make_case(len(lens), S, H, 512, 64, T, list(lens), dtype, layout, seed)
    return ((q_latent, q_pe), one_buffer_queries(q_latent, q_pe)), tuple(cache)


def _same_bits_both_copies(kernel, queries, cache, tag, splits=0):
    """Runs `kernel` on each query layout by TMA and by cp.async: same bits; the TMA flags as the rules give.
    Returns the TMA run's outputs of the contiguous queries."""
    _, S, H, R = queries[0][0].shape
    first = None
    for q in queries:
        got = {}
        for tma in (False, True):
            out, lse, ran = run_forced((*q, *cache), kernel, splits=splits, tma=tma)
            assert ran.kernel == kernel and (not splits or ran.splits == splits), f"{tag}: ran {ran}"
            want = _tma_expected(kernel, S, H, R, 64, tma)
            assert (ran.q_tma, ran.kv_tma) == want, f"{tag} tma={tma}: ran {ran}, expected {want}"
            got[tma] = out, lse
        assert not torch.isnan(got[True][0]).any(), tag
        assert torch.equal(got[False][0], got[True][0]) and torch.equal(got[False][1], got[True][1]), tag
        if first is None:
            first = got[True]
    return first


@pytest.mark.parametrize("H, S", [(128, 1), (16, 1), (40, 1), (1, 1), (32, 2), (16, 3)])
def test_mma_tiles_by_tma_same_bits(H, S):
    """The mma kernel's query tile by TMA (M heads of one token a box, heads past H read as zeros) and its cache
    tiles by TMA (32-row boxes, rows past T read as zeros, a split's last tile zeroed past its end in shared memory;
    the cache past each length is NaN here) feed the same fragments as its cp.async copies into padded rows: outputs
    bit-identical, for contiguous and strided queries, with empty and ragged sequences (split partials and the
    combine). Where TMA does not serve (an M tile across tokens: S > 1 and H not a multiple of M) the copies stay
    cp.async, and at R = 256 (64-byte rope rows) too."""
    if not IS_SM90:
        pytest.skip("the TMA copies need compute capability 9.0")
    seed = _seed("mma-tma", H, S)
    dtype = torch.float16 if H == 40 else torch.bfloat16
    _same_bits_both_copies("mma", *_query_layouts_case(S, H, dtype, seed), f"mma H={H} S={S} seed={seed}")
    _, _, ran = run_forced(make_case(1, 1, H, 256, 32, 300, [300], dtype, "packed", seed), "mma")
    assert (ran.q_tma, ran.kv_tma) == (False, False), f"R=256: ran {ran}"


@pytest.mark.parametrize("splits", [0, 1, 3, 7, 64])
@pytest.mark.parametrize("H, S, layout", [(128, 1, "packed"), (128, 2, "separate"), (64, 1, "separate"),
                                          (64, 3, "packed"), (192, 1, "packed"), (16, 1, "packed"),
                                          (16, 3, "separate"), (40, 2, "separate")])
def test_seesaw_tiles_by_tma_same_bits(H, S, layout, splits):
    """The seesaw kernel's query tile by TMA (H a multiple of 64) and its cache tiles by TMA (whole 64-row boxes:
    real rows, here NaN, past a split's end, zeroed in shared memory before PV; zeros past the capacity) hold the
    same bytes where the products read them as its cp.async copies (zero-filled): outputs bit-identical, for
    contiguous and strided queries, ragged and empty sequences, left padding, tails of every split count (0: the
    heuristic), padded query rows (S*H = 16, 48, 80), both orders (S*H <= 32: the late one); and right."""
    _skip_unless_sm90("seesaw")
    seed = _seed("seesaw-tma", H, S, layout, splits)
    dtype = torch.float16 if S == 2 else torch.bfloat16
    queries, cache = _query_layouts_case(S, H, dtype, seed, layout, lens=(2000, 0, 777, 1, 64, 129), T=2100)
    out, lse = _same_bits_both_copies("seesaw", queries, cache, f"seesaw H={H} S={S} {layout} seed={seed}", splits)
    check_outputs((*queries[0], *cache), out, lse, f"seesaw H={H} S={S} {layout} splits={splits} seed={seed}")


# ---- The narrow kernel: its own shapes (R = 512, S*H <= 16: one 16-row query tile, the heads as wgmma's N), each
# against float64 with NaN outside the ranges.
@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H, S", [(16, 1), (1, 1), (4, 1), (8, 2), (5, 3), (2, 8), (13, 1)])
def test_narrow_sweep(H, S, dtype, layout):
    """Ragged lengths (1, 0, 33, random, the full capacity) at every head count and token count the narrow kernel
    serves: padded query columns (S*H < 16), causal new tokens, fp16 and bf16, packed and separate caches."""
    seed = _seed("narrow-sweep", H, S, str(dtype), layout)
    T, lens = _ragged_lens(seed)
    tag = f"H={H} S={S} {dtype} {layout} T={T} lens={lens} seed={seed}"
    check_forced("narrow", make_case(len(lens), S, H, 512, 64, T, lens, dtype, layout, seed), tag)


@pytest.mark.parametrize("layout", ["packed", "separate"])
def test_narrow_tile_edges_and_batch_one(layout):
    """Lengths around the 64-row tiles, pairs of tiles (a warpgroup with no tile) and split boundaries; batch 1 at a
    few lengths (many splits, the combine); short sequences in a long buffer (empty splits)."""
    seed = _seed("narrow-edges", layout)
    lens = TILE_EDGE_LENS
    check_forced("narrow", make_case(len(lens), 1, 16, 512, 64, 4096, lens, torch.bfloat16, layout, seed),
                 f"edges {layout} lens={lens} seed={seed}")
    for L in (1, 64, 65, 128, 129, 1000, 4096):
        seed = _seed("narrow-b1", layout, L)
        check_forced("narrow", make_case(1, 1, 16, 512, 64, 4096, [L], torch.bfloat16, layout, seed),
                     f"B=1 L={L} seed={seed}")
    seed = _seed("narrow-sparse", layout)
    check_forced("narrow", make_case(4, 2, 8, 512, 64, 32768, [5, 100, 0, 37], torch.bfloat16, layout, seed),
                 f"sparse seed={seed}")


def test_narrow_strided_queries():
    """Queries as views of one [B, S, H, R+P] buffer (strides, not contiguity) through the narrow kernel."""
    seed = _seed("narrow-strided")
    check_forced("narrow", strided_case(2, 8, seed), f"strided seed={seed}")


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64, 128])
def test_narrow_forced_splits(splits):
    """Any split-KV factor: uneven chunks, empty splits, one split."""
    seed = _seed("narrow-splits", splits)
    lens = [4000, 1, 777]
    check_forced("narrow", make_case(3, 1, 16, 512, 64, 4096, lens, torch.bfloat16, "packed", seed),
                 f"lens={lens} seed={seed}", splits=splits)
    seed += 1
    check_forced("narrow", make_case(1, 2, 8, 512, 64, 3000, [2999], torch.float16, "separate", seed),
                 f"B=1 S=2 H=8 fp16 seed={seed}", splits=splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_narrow_growing_scores(dtype):
    """Scores that grow along the cache: each warpgroup's running max jumps many times, and the two maxima differ
    when they merge."""
    seed = _seed("narrow-growing", str(dtype))
    check_forced("narrow", growing_case(1, 16, dtype, seed), f"growing {dtype} seed={seed}")


@pytest.mark.slow
def test_narrow_long_context():
    """128K tokens at batch 1 and a ragged batch of long sequences."""
    seed = _seed("narrow-long")
    T = 131072
    check_forced("narrow", make_case(1, 1, 16, 512, 64, T, [T], torch.bfloat16, "packed", seed), f"long B=1 seed={seed}")
    lens = [T - 17, 65537, 1]
    check_forced("narrow", make_case(3, 1, 16, 512, 64, T, lens, torch.bfloat16, "separate", seed + 1),
                 f"long B=3 lens={lens} seed={seed + 1}")


# ---- The public op's plumbing: through ops, CUDA graphs, torch.compile, bad inputs.
def test_dispatch_through_ops():
    """mla_patch.ops.mla_decode with backend='kernel' reaches the kernel and agrees with it; so does decode_forced
    with the dispatch's own choice."""
    inputs = make_case(2, 1, 16, 512, 64, 300, [300, 77], torch.bfloat16, "packed", _seed("ops"))
    out, lse = ops.mla_decode(*inputs, SM_SCALE, backend="kernel")
    out2, lse2 = run_kernel(*inputs)
    out3, lse3, _ = run_forced(inputs, "auto")
    for o, l in ((out2, lse2), (out3, lse3)):
        torch.testing.assert_close(out, o, rtol=0, atol=0)
        torch.testing.assert_close(lse, l, rtol=0, atol=0)


def test_cuda_graph_capture():
    """The op captures into a CUDA graph (no syncs, allocator-only memory) and replays on new data."""
    inputs = make_case(4, 1, 128, 512, 64, 2048, [2048, 1, 900, 0], torch.bfloat16, "packed", _seed("graph"))
    op = torch.ops.mla_patch.mla_decode
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(*inputs, SM_SCALE)  # warm-up outside capture (sets the kernel's shared-memory attribute)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = op(*inputs, SM_SCALE)
    fresh = make_case(4, 1, 128, 512, 64, 2048, [17, 2048, 0, 1500], torch.bfloat16, "packed", _seed("graph2"))
    for dst, src in zip(inputs, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want, want_lse = op(*fresh, SM_SCALE)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


@pytest.mark.parametrize("kernel, H, T", [("mma", 16, 8192), ("seesaw", 128, 8192), ("narrow", 16, 131072)])
def test_graph_of_back_to_back_calls(kernel, H, T):
    """Programmatic dependent launch (on from compute capability 9.0) overlaps each kernel's prologue with the one
    before: a CUDA graph of back-to-back calls (main kernel, combine, next main kernel), at shapes where the default
    dispatch runs `kernel`, replays to the eager calls' bits."""
    _skip_unless_sm90(kernel)
    op = torch.ops.mla_patch.mla_decode
    sets = [make_case(1, 1, H, 512, 64, T, [T - 5 * i], torch.bfloat16, "packed", _seed("pdl", kernel, i))
            for i in range(3)]
    assert run_forced(sets[0], "auto")[2].kernel == kernel
    want = [run_kernel(*s) for s in sets]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for s in sets:
            op(*s, SM_SCALE)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [op(*s, SM_SCALE) for s in sets]
    for o, _ in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for (o, l), (ow, lw) in zip(outs, want):
        assert torch.equal(o, ow) and torch.equal(l, lw)


def test_torch_compile_fullgraph():
    inputs = make_case(2, 2, 16, 256, 32, 500, [500, 31], torch.float16, "separate", _seed("compile"))

    def f(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end):
        out, lse = torch.ops.mla_patch.mla_decode(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, SM_SCALE)
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True)
    out, lse = compiled(*inputs)
    want, want_lse = f(*inputs)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def _good():
    return make_case(2, 1, 16, 512, 64, 64, [64, 10], torch.bfloat16, "packed", 7)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: (a[0].float(), *a[1:]), "q_latent must be bfloat16 or float16"),
        (lambda a: (a[0], a[1].half(), *a[2:]), "share one dtype"),
        (lambda a: (a[0].cpu(), *a[1:]), "q_latent must be a CUDA tensor"),
        (lambda a: (a[0], a[1], a[2].contiguous()[:, :, :256], *a[3:]), "c_kv must be"),
        (lambda a: (a[0][..., :256].contiguous(), a[1], a[2][..., :256], *a[3:]), r"\(kv_lora_rank, rope\)"),
        (lambda a: (*a[:4], a[4].long(), a[5]), "kv_start must be int32"),
        (lambda a: (*a[:5], a[5][:1]), "kv_end must have shape"),
        (lambda a: (a[0], a[1], a[2], a[3][:, :10], *a[4:]), "k_pe must be"),
        (lambda a: (a[0], a[1][:, :, :, :32], *a[2:]), r"\(kv_lora_rank, rope\)|k_pe must be"),
        (lambda a: (a[0].transpose(-1, -2).contiguous().transpose(-1, -2), *a[1:]), "contiguous in its last dim|must have"),
        (lambda a: (*a[:2], torch.empty(2 * 64 * 512 + 1, dtype=torch.bfloat16, device=DEV)[1:].view(2, 64, 512), *a[3:]), "16-byte aligned"),
    ],
    ids=["float32", "mixed-dtype", "cpu", "c_kv-R", "dims", "int64-lens", "lens-shape", "k_pe-T", "q_pe-P", "last-dim-stride", "misaligned"],
)
def test_bad_inputs_raise(mutate, match):
    args = mutate(_good())
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mla_patch.mla_decode(*args, SM_SCALE)
    torch.cuda.synchronize()  # and the context is still healthy


def test_bad_lengths_never_read_out_of_range():
    """kv_start < 0 or kv_end > T are clamped on the GPU: no illegal access, rows in range only."""
    q_latent, q_pe, c_kv, k_pe, _, _ = make_case(2, 1, 16, 512, 64, 96, [96, 96], torch.bfloat16, "packed", 11)
    kv_start = torch.tensor([-5, 50], dtype=torch.int32, device=DEV)
    kv_end = torch.tensor([10**6, 40], dtype=torch.int32, device=DEV)
    out, lse = run_kernel(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end)
    ref, _ = mla_decode_ref(
        q_latent.double(), q_pe.double(), c_kv.double(), k_pe.double(),
        kv_start.clamp(0, 96), kv_end.clamp(0, 96), SM_SCALE,
    )
    assert _rel(out, ref) < 1e-2 and math.isinf(lse[1].max().item())


# ---- The per-CTA timeline (dev/kernel_timeline.py), written by the one call it is passed to.
@pytest.mark.parametrize("kernel", kernel_probe.KERNELS)
def test_timeline_stamps(kernel):
    """Outputs bit-identical with the timeline on; a later call without it writes nothing; one stamped row per CTA of
    the decode grid and per combine block, with the block index and tiles the split arithmetic gives, stamps in phase
    order within a CTA and the combine's after every decode CTA's exit; bad buffers raise."""
    _skip_unless_sm90(kernel)
    H, L, splits = (16 if kernel == "narrow" else 128), 5000, 6
    case = make_case(1, 1, H, 512, 64, L, [L], torch.bfloat16, "packed", _seed("timeline", kernel))
    want = run_forced(case, kernel, splits=splits)
    stamps = torch.zeros(2, 64, 32, dtype=torch.int64, device=DEV)
    got = run_forced(case, kernel, splits=splits, timeline=stamps)
    written = stamps.clone()
    after = run_forced(case, kernel, splits=splits)
    assert got[2] == want[2] and got[2].splits == splits, got[2]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(after[0], want[0])
    assert torch.equal(stamps, written), "a call without timeline= wrote into the last call's buffer"
    # Query rows a CTA, cache rows a split is rounded to, cache rows a tile.
    m_tile, n_split, tile = {"mma": (32, 32, 32), "seesaw": (64, 128, 64), "narrow": (16, 128, 64)}[kernel]
    x_tiles = _ceil_div(H, m_tile)
    per = _ceil_div(_ceil_div(L, splits), n_split) * n_split
    decode = stamps[0].cpu()
    # TimelineSlot (csrc/mla_decode.cuh): entry 1, waited 2, lengths 3, q 4, first 5, loop_end 6 (7: warpgroup 1's),
    # exit 8. The sm_90a kernels stamp q, first and the loop ends (seesaw its exit too) only in a build with
    # MLA_PATCH_TIMELINE_PHASES=1: all of them or none.
    order = [1, 2, 3, 5, 6, 8]
    if kernel != "mma":
        gated = (4, 5, 6, 7, 8) if kernel == "seesaw" else (4, 5, 6, 7)
        phases = decode[0, [2 * s + 2 for s in gated]] != 0
        assert phases.all() or not phases.any(), f"{kernel} phase stamps partly written: {phases.tolist()}"
        order = [1, 2, 3, 4, 5, 6, 8] if phases.all() else [1, 2, 3] if kernel == "seesaw" else [1, 2, 3, 8]
    stamped = decode[:, 4] != 0
    assert stamped.sum().item() == x_tiles * splits and not stamped[x_tiles * splits:].any()
    for blk in range(x_tiles * splits):
        row = decode[blk].tolist()
        x, y = blk % x_tiles, blk // x_tiles
        assert row[1] == x | (y << 20), f"block {blk}: index word {row[1]:#x}"
        rows = max(0, min(L, (y + 1) * per) - min(L, y * per))
        assert row[2] == _ceil_div(rows, tile), f"block {blk}: {row[2]} tiles for {rows} rows"
        ns = [row[2 * s + 2] for s in order]
        clk = [row[2 * s + 3] for s in order]
        assert all(v > 0 for v in ns) and ns == sorted(ns) and clk == sorted(clk), f"block {blk}: {ns} {clk}"
    combine = stamps[1].cpu()
    used = combine[:, 4] != 0
    assert used.any()
    last_exit = decode[stamped][:, 2 * order[-1] + 2].max()
    assert (combine[used][:, 2 * 2 + 2] >= last_exit).all(), "a combine block passed pdl_wait before the decode grid ended"
    for bad in (torch.zeros(2, 8, 31, dtype=torch.int64, device=DEV), torch.zeros(2, 8, 32, dtype=torch.int32, device=DEV),
                torch.zeros(2, 8, 32, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="timeline"):
            run_forced(case, kernel, splits=splits, timeline=bad)
    torch.cuda.synchronize()
