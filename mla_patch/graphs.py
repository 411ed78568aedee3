"""Decode steps replayed from CUDA graphs that mla_patch captures itself: generate()'s default on CUDA.

Eager decode of these models is bound by the host, not the GPU: a DeepSeek-V2-Lite step launches
over a thousand small kernels (27 layers, MoE), each costing more Python time than GPU time at small
batch. transformers removes that cost only for a static cache compiled by torch.compile, which takes
minutes on a MoE model and recompiles for every new batch size and cache length. Here the whole
decode step (embedding to logits) is captured once per (batch, cache capacity) with one eager warm-up
step, and every later step of that shape is one graph replay.

How it plugs in: generate() asks a model whether its decode step may be swapped for a faster callable
(`_valid_auto_compile_criteria`, `get_compiled_call`: transformers' own hook for its auto-compile);
patch() answers yes for a LatentCache on one CUDA device and hands it `GraphedDecode`, which replays
eligible steps and runs everything else as before. `generate(..., disable_compile=True)` opts out.

What a replay cannot do is read host values, so a captured step takes its positions from device
tensors (cache.CapturedStep): where the new latent row goes, and which rows each sequence sees. Those
are refilled before each replay; the host-side length is advanced after it.
"""

from __future__ import annotations

import collections
import contextlib
import time
import weakref

import torch

from . import ops
from .attention import _stats
from .cache import CACHE_KWARG, CapturedStep, LatentCache

# Arguments generate() passes to a decode step that a replay reproduces; any other non-None
# argument sends the step to the eager forward.
_REPLAYED = {"input_ids", "attention_mask", "position_ids", CACHE_KWARG, "use_cache", "return_dict",
             "logits_to_keep", "cache_position"}
_FLAGS_OFF = ("output_attentions", "output_hidden_states", "output_router_logits")
MAX_SHAPES = 2  # captured shapes (and their cache buffers) kept per model; the oldest goes first


def model_unsupported_reason(model) -> str | None:
    """Why this model's decode steps cannot be captured, or None (checked once per generate() call)."""
    device = getattr(model, "device", None)
    if device is None or device.type != "cuda":
        return f"the model is on {getattr(device, 'type', 'no device')}, CUDA graphs need CUDA"
    placements = set(getattr(model, "hf_device_map", {}).values())
    if len(placements) > 1:
        return f"the model is spread over {sorted(map(str, placements))} (device_map): one CUDA device is captured"
    if getattr(model, "hf_quantizer", None) is not None:
        return "the model is quantized"
    if model.training:
        return "the model is in training mode"
    held = model.__dict__.get("_mla_decode_graphs")
    return held.failed if held is not None else None


def graphs_of(model) -> "DecodeGraphs":
    graphs = model.__dict__.get("_mla_decode_graphs")
    if graphs is None:
        graphs = model.__dict__["_mla_decode_graphs"] = DecodeGraphs()
    return graphs


class _Captured:
    """One captured decode step: its graph, static inputs and output."""

    def __init__(self, batch: int, device):
        self.step = CapturedStep(
            write_pos=torch.zeros(1, dtype=torch.long, device=device),
            kv_start=torch.zeros(batch, dtype=torch.int32, device=device),
            kv_end=torch.zeros(batch, dtype=torch.int32, device=device),
        )
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph = None
        self.output: dict = {}  # the captured output's fields (logits: the graph's buffer), without the cache
        self.output_type = None
        self.experts = None  # the experts implementation captured (MoE models), and each one's replay ms
        self.experts_ms: dict = {}

    def load(self, input_ids, position_ids, kv_start, length: int) -> None:
        """Fill the static inputs for the step that writes row `length` (no host sync)."""
        self.ids.copy_(input_ids)
        if position_ids is None:
            self.positions.fill_(length)
        else:
            self.positions.copy_(position_ids)
        self.step.write_pos.fill_(length)
        self.step.kv_end.fill_(length + 1)
        self.step.kv_start.copy_(kv_start)


class _Binding:
    """What one cache needs per step: its buffers' identity and each sequence's first valid row."""

    def __init__(self, key, kv_start, reason=None):
        self.key, self.kv_start, self.reason = key, kv_start, reason


class DecodeGraphs:
    """A model's captured decode steps, keyed by the cache buffers and weights they read."""

    def __init__(self):
        self.captured: collections.OrderedDict = collections.OrderedDict()  # key -> _Captured
        self.buffers: dict = {}  # (shape, dtype, device) -> [[buffer, weakref to its cache]]
        self.pool = None  # one memory pool for all graphs of this model (they never run at once)
        self.failed: str | None = None
        self.replays = 0
        self.warmup_s = 0.0

    # -- cache buffers that outlive a generate() call, so its graphs can be replayed by the next ----
    def lend_buffers(self, cache: LatentCache) -> None:
        """Give `cache` this model's buffers of its shape. A cache still held from an earlier call (e.g.
        returned by return_dict_in_generate) first gets a copy of its rows: it stays valid, and this call
        still replays the graphs captured on those buffers."""
        owner = weakref.ref(cache)  # weak: the layers hold this function, and the cache must die with its call

        def allocate(shape, dtype, device):
            slots = self.buffers.setdefault((tuple(shape), dtype, torch.device(device)), [])
            free = [slot for slot in slots if slot[1]() is None]
            taken = [slot for slot in slots if slot[1]() is not None and slot[1]() is not owner()]
            for slot in free + taken:
                _move_rows_out(slot[1](), slot[0])
                slot[1] = owner
                return slot[0]
            buffer = torch.empty(shape, dtype=dtype, device=device)
            slots.append([buffer, owner])
            return buffer

        for layer in cache.latent_layers():
            layer.allocate = allocate

    def buffer_bytes(self) -> int:
        return sum(slot[0].numel() * slot[0].element_size() for slots in self.buffers.values() for slot in slots)

    def _forget_oldest(self) -> None:
        key, _ = self.captured.popitem(last=False)
        kept = {ptr for other in self.captured for ptr in other[0][0]}  # key: ((pointers, shape, dtype), weights)
        for shape_key in list(self.buffers):
            self.buffers[shape_key] = [s for s in self.buffers[shape_key] if s[0].data_ptr() in kept or s[1]() is not None]

    # -- one decode step ----------------------------------------------------------------------------
    def run(self, model, inputs: dict):
        """The step's output, from a replay where the step allows one, else from the eager forward."""
        cache = inputs.get(CACHE_KWARG)
        layers = cache.latent_layers() if isinstance(cache, LatentCache) else []
        binding = self._binding(model, cache, layers, inputs)
        if binding.reason is not None:
            return model(**inputs)
        captured = self.captured.get(binding.key)
        length = layers[0].length
        if captured is None:
            captured = self._capture(model, cache, layers, inputs, binding, length)
            if captured is None:
                return model(**inputs)
        else:
            self.captured.move_to_end(binding.key)
            captured.load(inputs["input_ids"], inputs.get("position_ids"), binding.kv_start, length)
        captured.graph.replay()
        for layer in layers:
            layer.advance(1)
        self.replays += 1
        _stats["graph_replays"] += 1
        _stats["absorbed_tokens"] += captured.ids.shape[0]
        return self._output(captured, cache)

    def _binding(self, model, cache, layers, inputs) -> _Binding:
        reason = self._step_unsupported_reason(cache, layers, inputs)
        if reason is not None:
            return _Binding(None, None, reason)
        key = (tuple(layer.buffer.data_ptr() for layer in layers), layers[0].buffer.shape, layers[0].buffer.dtype)
        binding = cache.__dict__.get("_mla_binding")
        if binding is None or binding.key[0] != key:
            binding = cache.__dict__["_mla_binding"] = self._bind(model, key, inputs.get("attention_mask"), inputs["input_ids"])
        return binding

    def _bind(self, model, buffers_key, mask, input_ids) -> _Binding:
        """Once per cache: check the padding mask (one host sync) and take each row's first valid row."""
        batch = input_ids.shape[0]
        if mask is None:
            kv_start = torch.zeros(batch, dtype=torch.int32, device=input_ids.device)
        else:
            mask = mask.to(torch.int32)
            # Left padding only: each row is zeros then ones; a hole or right padding is no range.
            if not bool((mask[:, 1:] >= mask[:, :-1]).all() & (mask[:, -1] == 1).all()):
                return _Binding((buffers_key,), None, "an attention mask that is not left padding")
            kv_start = (mask == 0).sum(dim=-1, dtype=torch.int32)
        weights = tuple(p.data_ptr() for p in model.parameters())  # a replaced weight needs a new capture
        return _Binding((buffers_key, weights), kv_start)

    @staticmethod
    def _step_unsupported_reason(cache, layers, inputs) -> str | None:
        """Why this step cannot be replayed; `layers` are the cache's latent layers."""
        if not isinstance(cache, LatentCache):
            return "not a LatentCache"
        if not layers or len(layers) != len(cache.layers) or not all(layer.is_initialized for layer in layers):
            return "a cache with non-latent layers, or before its prefill"
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or not ids.is_cuda:
            return "not one new token per sequence"
        for name, value in inputs.items():
            if name not in _REPLAYED and value is not None and not (name in _FLAGS_OFF and not value):
                return f"argument {name}"
        length, buffer = layers[0].length, layers[0].buffer
        if any(layer.length != length or layer.buffer.shape != buffer.shape for layer in layers):
            return "layers of different lengths"
        if length + 1 > buffer.shape[2] or buffer.shape[0] != ids.shape[0]:
            return "the cache is full or of another batch"
        mask = inputs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[1] != length + 1):
            return "an attention mask that is not [batch, length]"
        return None

    def _capture(self, model, cache, layers, inputs, binding, length):
        """Warm up one step eagerly on a side stream, then capture it; None (and eager from then on) on failure.

        A MoE model's step is captured with each of transformers' two graph-safe experts implementations
        and the faster kept: generate() decodes with batched_mm (it copies each picked expert's weights per
        token: best for a few tokens), while grouped_mm reads each picked expert once (best for a batch)."""
        start = time.perf_counter()
        ids = inputs["input_ids"]
        captured = _Captured(ids.shape[0], ids.device)
        captured.load(ids, inputs.get("position_ids"), binding.kv_start, length)
        call = {"input_ids": captured.ids, "position_ids": captured.positions, CACHE_KWARG: cache,
                "use_cache": True, "return_dict": True}
        if inputs.get("logits_to_keep") is not None:
            call["logits_to_keep"] = inputs["logits_to_keep"]
        for layer in layers:
            layer.step = captured.step
        try:
            timings, choices = [], _experts_choices(model)
            for experts in choices:
                try:
                    with experts_as(model, experts):
                        graph, output = self._record(model, call, ids.device)
                except Exception:
                    if experts is None:  # the model as it is cannot be captured
                        raise
                    continue  # the other experts kernel cannot (here): keep the model's own
                timings.append((_replay_ms(graph) if len(choices) > 1 else 0.0, graph, output, experts))
            _, captured.graph, output, captured.experts = min(timings, key=lambda t: t[0])
            # The output's fields but the cache (held here it would keep that cache and its rows alive).
            captured.output_type = type(output)
            captured.output = {k: v for k, v in output.items() if k not in ("cache", "past_key_values")}
            captured.experts_ms = {str(t[3]): t[0] for t in timings}
        except Exception as err:  # e.g. a host sync in a module we do not own (an eager MoE loop)
            self.failed = f"capturing the decode step failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            ops.logger.warning("mla_patch: %s; decode runs eagerly for this model", self.failed)
            return None
        finally:
            for layer in layers:
                layer.step = None
        if len(self.captured) >= MAX_SHAPES:
            self._forget_oldest()
        self.captured[binding.key] = captured
        self.warmup_s += time.perf_counter() - start
        return captured

    def _record(self, model, call, device):
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model(**call)  # warm-up: writes row `length`, which the replay writes again
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = model(**call)
        return graph, output

    @staticmethod
    def _output(captured, cache):
        """A fresh output object: logits copied out of the graph's buffer, the caller's cache."""
        out = captured.output_type(**captured.output)
        out["logits"] = captured.output["logits"].clone()
        fields = getattr(captured.output_type, "__dataclass_fields__", {})
        out["cache" if "cache" in fields else "past_key_values"] = cache
        return out


def _experts_choices(model) -> list:
    """None (as the model is) and, for a MoE model decoding with one of transformers' graph-safe experts
    implementations, the mapping with the other one."""
    current = model.get_experts_implementation() if hasattr(model, "get_experts_implementation") else {}
    other = {"batched_mm": "grouped_mm", "grouped_mm": "batched_mm"}
    if not any(value in other for value in current.values()):
        return [None]
    return [None, {key: other.get(value, value) for key, value in current.items()}]


@contextlib.contextmanager
def experts_as(model, experts):
    """The model's experts implementation set to `experts` (a mapping; None leaves it) for the block."""
    if experts is None:
        yield
        return
    previous = model.get_experts_implementation()
    model.set_experts_implementation(experts)
    try:
        yield
    finally:
        model.set_experts_implementation(previous)


def _replay_ms(graph, repeats: int = 3) -> float:
    """The best of a few replays (each a whole decode step; it rewrites the same cache row)."""
    graph.replay()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def _move_rows_out(cache: LatentCache | None, buffer: torch.Tensor) -> None:
    """The layer of `cache` that holds `buffer` gets its own copy of it (no-op without one)."""
    for layer in cache.latent_layers() if cache is not None else ():
        if layer.buffer is buffer:
            layer._replace_batch(buffer.clone())


class GraphedDecode:
    """What patch() gives generate() as its decode callable: replays for LatentCache steps, and
    transformers' own compiled call for the caches it compiles (cache_implementation="static")."""

    def __init__(self, model, compile_config):
        self.model_ref = weakref.ref(model)
        self.compile_config = compile_config
        self._compiled = None

    def __call__(self, **inputs):
        model = self.model_ref()
        if isinstance(inputs.get(CACHE_KWARG), LatentCache):
            return graphs_of(model).run(model, inputs)
        if self._compiled is None:
            from transformers import PreTrainedModel

            self._compiled = PreTrainedModel.get_compiled_call(model, self.compile_config)
        return self._compiled(**inputs)
