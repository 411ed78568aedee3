"""A few calls of an sm_90a kernel (v7, the seesaw; v7plan, its balanced grid; v7tmakv, its cache tiles by TMA;
v8, its 2-CTA pair; v9, the narrow kernel) against the float64 reference, before the test suite.

A hang or a crash here costs seconds under `timeout`, not the whole test run; scripts/gpu_check.sh
then keeps that kernel out of the rest of the run (v7: MLA_PATCH_WGMMA=0 and no v7 tests; v8: no v8 tests or
timings; v7plan: MLA_PATCH_PLAN=0 and no plan tests; v7tmakv: MLA_PATCH_TMA_KV=0, no tmakv tests or timings; v9:
MLA_PATCH_NARROW=0, no v9 tests or timings), so the run still yields the other kernels' tests and numbers.
Usage: python3 scripts/wgmma_smoke.py [v7|v7plan|v7tmakv|v8|v9]
Exit status 0: it ran and matched; 1: wrong or NaN; 2: the kernel did not run (not sm_90 / not built).
"""

from __future__ import annotations

import sys
import time

import torch

from mla_patch import ops
from mla_patch.reference import mla_decode_ref

MODES = {"v7": 1, "v7plan": 1, "v7tmakv": 1, "v8": 2, "v9": 3}  # _wgmma_mode / _last_path values
PLAN = {"v7": 0, "v7plan": 1, "v7tmakv": 0}  # _plan_mode: v7's regular or balanced grid
TMA_KV = {"v7": 0, "v7plan": 0, "v7tmakv": 1}  # _tma_kv: v7's cache tiles by cp.async or TMA
# (R, P, H, S, B, L); v8 serves only R = 512 with an even number of 64-row query tiles, v9 R = 512 with S*H <= 16.
CASES = {
    "v7": [(512, 64, 128, 1, 2, 1000), (512, 64, 16, 1, 3, 4100), (256, 32, 64, 2, 3, 300), (512, 64, 128, 1, 1, 70000)],
    "v8": [(512, 64, 128, 1, 2, 1000), (512, 64, 128, 2, 3, 300), (512, 64, 128, 1, 1, 70000)],
    "v9": [(512, 64, 16, 1, 2, 1000), (512, 64, 16, 1, 3, 4100), (512, 64, 8, 2, 3, 300), (512, 64, 16, 1, 1, 70000)],
}
CASES["v7plan"] = CASES["v7"]
CASES["v7tmakv"] = [(512, 64, 128, 1, 2, 1000), (512, 64, 16, 1, 3, 4100), (512, 64, 40, 2, 3, 300),
                    (512, 64, 128, 1, 1, 70000)]  # all served by TMA tiles (R = 512), both orders


def main(name: str) -> int:
    assert ops.has_kernel(), ops.extension_error()
    op = torch.ops.mla_patch
    mode = MODES[name]
    op._wgmma_mode(mode)
    if name in PLAN:
        op._plan_mode(PLAN[name])
        op._tma_kv(TMA_KV[name])
    g = torch.Generator(device="cuda").manual_seed(7)
    worst = 0.0
    for R, P, H, S, B, L in CASES[name]:
        q = torch.randn(B, S, H, R + P, generator=g, device="cuda").bfloat16()
        buf = torch.randn(B, L, R + P, generator=g, device="cuda").bfloat16()
        start = torch.tensor([0, 17, 0][:B], dtype=torch.int32, device="cuda")
        end = torch.tensor([L, L - 3, 1][:B], dtype=torch.int32, device="cuda")
        t0 = time.perf_counter()
        out, lse = op.mla_decode(q[..., :R], q[..., R:], buf[..., :R], buf[..., R:], start, end, 0.07)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        ran_as = (op._last_plan(), op._last_kv_tma())
        if op._last_path() != mode or (name in PLAN and ran_as != (PLAN[name], TMA_KV[name])):
            print(f"{name} did not run for R={R} H={H} S={S} (kernel {op._last_path()})")
            return 2
        ref, _ = mla_decode_ref(q[..., :R].double(), q[..., R:].double(), buf[..., :R].double(),
                                buf[..., R:].double(), start, end, 0.07)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"{name} R={R} P={P} H={H} S={S} B={B} L={L}: rel err {err:.2e}, NaN {bool(out.isnan().any())}, {ms:.1f} ms")
        worst = max(worst, err if err == err else float("inf"))
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "v7"))
