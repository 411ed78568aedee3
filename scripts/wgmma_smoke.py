"""One call of the sm_90a wgmma path (kernel v5) against the float64 reference, before the test suite.

A hang or a crash here costs seconds under `timeout`, not the whole test run; scripts/gpu_check.sh
then switches the path off (MLA_PATCH_WGMMA=0) and leaves its forced-on tests out.
Exit status 0: it ran and matched; 1: wrong or NaN; 2: the path did not run (not an H100 / not built).
"""

from __future__ import annotations

import sys

import torch

from mla_patch import ops
from mla_patch.reference import mla_decode_ref


def main() -> int:
    assert ops.has_kernel(), ops.extension_error()
    op = torch.ops.mla_patch
    op._wgmma_mode(1)
    g = torch.Generator(device="cuda").manual_seed(7)
    worst = 0.0
    for R, P, H, S, B, L in [(512, 64, 128, 1, 2, 1000), (256, 32, 64, 2, 3, 300)]:
        q = torch.randn(B, S, H, R + P, generator=g, device="cuda").bfloat16()
        buf = torch.randn(B, L, R + P, generator=g, device="cuda").bfloat16()
        start = torch.tensor([0, 17, 0][:B], dtype=torch.int32, device="cuda")
        end = torch.tensor([L, L - 3, 1][:B], dtype=torch.int32, device="cuda")
        calls = op._wgmma_calls()
        out, lse = op.mla_decode(q[..., :R], q[..., R:], buf[..., :R], buf[..., R:], start, end, 0.07)
        torch.cuda.synchronize()
        if op._wgmma_calls() == calls:
            print(f"wgmma path did not run for R={R} H={H} S={S}")
            return 2
        ref, _ = mla_decode_ref(q[..., :R].double(), q[..., R:].double(), buf[..., :R].double(),
                                buf[..., R:].double(), start, end, 0.07)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"wgmma R={R} P={P} H={H} S={S} B={B} L={L}: rel err {err:.2e}, NaN {bool(out.isnan().any())}")
        worst = max(worst, err if err == err else float("inf"))
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
