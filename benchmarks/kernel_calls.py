"""The decode kernels under test: the labels the result files use, and graph-ready calls of each.

The default path is `torch.ops.mla_patch.mla_decode` (the extension's dispatch picks kernel and splits); a
named kernel runs through `mla_patch.kernel_probe.decode_forced`, which raises where it cannot serve a call.
"""

from __future__ import annotations

import torch

from benchmarks.decode_inputs import SCALE
from mla_patch import kernel_probe

# kernel_probe's names -> the labels of bench_kernel.json (`path`, `<label>_us`), which BENCHMARKS.md cites.
LABELS = {"mma": "mma", "seesaw": "v7", "narrow": "v9"}


def kernel_named(name: str) -> str:
    """kernel_probe's name for a label ("v7"), a name ("seesaw") or "default" (the dispatch's choice)."""
    if name in ("default", "auto"):
        return "auto"
    for kernel, label in LABELS.items():
        if name in (kernel, label):
            return kernel
    known = ", ".join(dict.fromkeys(["default", *LABELS, *LABELS.values()]))
    raise ValueError(f"unknown kernel {name!r}: one of {known}")


def default_calls(sets) -> list:
    """One call of the default path per input set."""
    op = torch.ops.mla_patch.mla_decode
    return [lambda s=s: op(*s, SCALE) for s in sets]


def forced(inputs, kernel: str, splits: int = 0, timeline=None):
    """(out, lse, Ran) of one call on `kernel` ("auto": the dispatch's) with `splits` split-KV chunks
    (0: the dispatch's count); `timeline` takes the per-CTA stamps (dev/kernel_timeline.py)."""
    return kernel_probe.decode_forced(*inputs, SCALE, kernel=kernel, splits=splits, timeline=timeline)


def forced_calls(sets, kernel: str, splits: int = 0) -> list:
    """One forced call per input set."""
    return [lambda s=s: forced(s, kernel, splits) for s in sets]


def serves(inputs, kernel: str, splits: int = 0):
    """(out, Ran) of one forced call, or None where the kernel cannot serve these inputs on this GPU."""
    try:
        out, _, ran = forced(inputs, kernel, splits)
    except RuntimeError:
        return None
    return out, ran
