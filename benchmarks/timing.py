"""How the benchmarks time things: CUDA-graph replays, CUDA events, the host clock, and the copy bandwidth."""

from __future__ import annotations

import time

import torch


def sync(*devices) -> None:
    """Wait for the queued GPU work of `devices` (default: the current CUDA device); a no-op without CUDA."""
    if torch.cuda.is_available():
        for device in devices or (None,):
            torch.cuda.synchronize(device)


def graph_us(fns, replays: int = 20) -> float:
    """Median microseconds a call of one CUDA graph that calls every fn once, divided by len(fns).

    The fns usually run one op on rotating input sets whose caches total several times the L2, so that each
    call reads from HBM as in decode; replaying a graph takes the launch overhead out of the time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture stream (lazy init, allocator pools)
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del graph
    return _median(times)


def event_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() between two CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return _median(times)


def wall_s(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() on the host clock, GPU work included; runs on the CPU too."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return _median(times)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Bytes read plus written per second (GB/s) by a device-to-device copy of `nbytes`: the ceiling a
    memory-bound decode is compared with (a read stream moves bytes at about this total rate)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def percentile(values, q: float) -> float:
    """The q-th percentile of `values` (an element of them, no interpolation); NaN for none."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def _median(values: list[float]) -> float:
    return percentile(values, 50)
