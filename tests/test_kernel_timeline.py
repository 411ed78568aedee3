"""dev/kernel_timeline.py reads the kernels' stamp rows right (CPU: synthetic rows in the kernels' layout).

The layout is csrc/common.cuh's TimelineSlot: per CTA 32 u64, [0] SM, [1] x | y << 20 | z << 40, [2] tiles,
stamp s at [2 s + 2] (globaltimer ns) and [2 s + 3] (clock64). The GPU side is tests/test_kernel.py's
test_timeline_stamps.
"""

from __future__ import annotations

import pytest
import torch

from dev import kernel_timeline

SLOTS = kernel_timeline.SLOTS


def _row(stamps, kernel, blk, sm, x, y, z, tiles, ns_by_slot, ghz=2.0):
    row = stamps[kernel, blk]
    row[0], row[1], row[2] = sm, x | (y << 20) | (z << 40), tiles
    for slot, ns in ns_by_slot.items():
        row[2 * slot + 2] = ns
        row[2 * slot + 3] = int(ns * ghz)


def _synthetic(with_exit=True):
    """4 decode CTAs on 2 SMs (two each), entering at 1000 + 100 i ns, each phase 1 us apart; 2 combine blocks."""
    stamps = torch.zeros(2, 8, 32, dtype=torch.int64)
    names = ["entry", "waited", "lengths", "first", "loop_end"] + (["exit"] if with_exit else [])
    for i in range(4):
        t0 = 1000 + 100 * i
        _row(stamps, 0, i, sm=i % 2, x=i % 2, y=i // 2, z=3, tiles=5,
             ns_by_slot={SLOTS[n]: t0 + 1000 * k for k, n in enumerate(names)})
    for i in range(2):
        _row(stamps, 1, i, sm=5, x=i, y=0, z=0, tiles=0,
             ns_by_slot={SLOTS["entry"]: 2000, SLOTS["waited"]: 7000 + 10 * i, SLOTS["exit"]: 9000 + 10 * i})
    return stamps


def test_rows_decode_to_blocks_and_stamps():
    decode = kernel_timeline.ctas(_synthetic(), 0)
    assert len(decode) == 4  # rows without an entry stamp are CTAs that never ran
    c = decode[3]
    assert (c["sm"], c["x"], c["y"], c["z"], c["tiles"]) == (1, 1, 1, 3, 5)
    assert c["ns"]["entry"] == 1300 and c["ns"]["exit"] == 6300 and "q" not in c["ns"]
    assert c["clk"]["first"] == 2 * 4300


def test_summary_phases_and_ends():
    stamps = _synthetic()
    lines, key = kernel_timeline.summarize(kernel_timeline.ctas(stamps, 0), kernel_timeline.ctas(stamps, 1))
    assert key["decode_ctas"] == 4 and key["sms"] == 2 and key["max_ctas_per_sm"] == 2
    assert key["entry->waited"] == pytest.approx(1.0) and key["entry->exit"] == pytest.approx(5.0)
    # 4 tiles after the first in 1 us of loop.
    assert key["per_tile"] == pytest.approx(0.25)
    assert key["decode_end"] == pytest.approx(5.3) and key["end"] == pytest.approx(8.01)
    assert any("last decode exit" in line for line in lines)


def test_summary_without_exit_stamps_uses_the_combines_wait():
    """A v7 build without MLA_PATCH_TIMELINE_PHASES has no exit stamp: the combine's pdl_wait bounds the grid."""
    stamps = _synthetic(with_exit=False)
    lines, key = kernel_timeline.summarize(kernel_timeline.ctas(stamps, 0), kernel_timeline.ctas(stamps, 1))
    assert key["decode_end"] == pytest.approx(6.01)
    assert any("no exit stamps" in line for line in lines)
    assert "entry->exit" not in key
