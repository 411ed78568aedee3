"""Where the wgmma kernel's time goes: time it with stages left out (a build with MLA_PATCH_DIAG=1).

    MLA_PATCH_DIAG=1 python setup.py build_ext --inplace && python scripts/bench_wgmma_diag.py

Variants (bits of DIAG in csrc/mla_decode_wgmma.cuh; their results are wrong, only their time counts):
  0 full kernel | 1 no cache loads in the loop | 2 no partial-score exchange (and its barrier)
  3 neither | 4 no wgmma in the loop | 6 no wgmma and no exchange
Prints µs and cycles per 32-row tile a CTA (at the clock the kernel ran, from nvidia-smi's max SM clock).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import SCALE, make_set, time_graph  # noqa: E402

from mla_patch import ops  # noqa: E402

NAMES = {0: "full", 1: "no loads", 2: "no exchange", 3: "no loads, no exchange", 4: "no wgmma",
         6: "no wgmma, no exchange"}


def main() -> None:
    assert ops.has_kernel(), ops.extension_error()
    op = torch.ops.mla_patch
    if not hasattr(op, "_wgmma_diag"):
        sys.exit("this build has no diagnostic variants: rebuild with MLA_PATCH_DIAG=1")
    op._wgmma_mode(2)  # v6, the kernel the diagnostics were built for
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    clock_ghz = 1.755  # H100 SXM boost under load (nvidia-smi max 1980; ncu saw 1.78)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for B, L in ((64, 4096), (128, 16384), (16, 16384)):
        sets = [make_set(B, 1, 128, L, gen=gen) for _ in range(max(2, int(4 * 50e6 // (B * L * 1152)) + 1))]
        fns = [lambda s=s: op.mla_decode(*s, SCALE) for s in sets]
        tiles_per_sm = B * 2 * (L // 32) / sms  # 2 CTAs (64 query rows each) a sequence at H = 128
        for diag in NAMES:
            op._wgmma_diag(diag)
            us = time_graph(fns)
            print(f"B={B:3d} L={L:6d} {NAMES[diag]:24s} {us:9.1f} us  {us * 1e3 * clock_ghz / tiles_per_sm:7.0f} clk/tile")
        op._wgmma_diag(0)


if __name__ == "__main__":
    main()
