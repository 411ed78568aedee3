"""The latent KV cache: per layer and token only the normalized c_kv and the roped k_pe.

Layout (one decision, two readers). Each layer owns one preallocated buffer
`[B, 1, capacity, R + P]`: a token is one packed row `[c_kv | k_pe]` (576 values for DeepSeek).
  - The kernel reads a tile of tokens as one contiguous run of rows (one 1152-byte row per bf16
    token), so c_kv and k_pe of a token arrive together; it addresses them by strides.
  - transformers sees the usual two slots, `keys = buf[..., :R]` and `values = buf[..., R:]`,
    4-D with batch on dim 0 and sequence on dim -2, exactly as DeepseekV2/V3 attention already
    caches latents. So crop, reorder, batch select and the mask-size logic keep their meaning.
Writes go in place at the current length; when the capacity is reached the buffer grows
geometrically (one copy of the valid prefix per doubling), so a decode step costs O(new tokens),
not O(context). generate() sizes the buffer from its max length (`capacity_for`), so it never grows there.

A decode step captured in a CUDA graph (graphs.py) cannot read the host-side length: while it is
recorded, each layer carries a `CapturedStep` whose device tensors say where the new row goes and
which rows each sequence sees; the layer then writes there and hands out the whole buffer.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

def _cache_kwarg() -> str:
    """The keyword forward() and generate() take the cache by: "cache" (5.20+) or "past_key_values" (5.17)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Model

    return "cache" if "cache" in inspect.signature(inspect.unwrap(DeepseekV2Model.forward)).parameters else "past_key_values"


CACHE_KWARG = _cache_kwarg()
INITIAL_CAPACITY = 256
GROWTH_FACTOR = 2
MIN_CAPACITY = 64


def capacity_for(tokens: int) -> int:
    """Rows to preallocate for `tokens`: the next of 64, 80, 96, 112, 128, 160, ... (each power of two in
    four steps), so a generation wastes under a quarter of its cache while the sizes, which key the
    captured decode steps, repeat across calls of similar lengths."""
    tokens = max(int(tokens), MIN_CAPACITY)
    step = 1 << max(tokens - 1, 1).bit_length() - 3  # an eighth of the next power of two
    return -(-tokens // step) * step


@dataclasses.dataclass
class CapturedStep:
    """Device tensors a captured decode step reads instead of host values (set by graphs.py)."""

    write_pos: torch.Tensor  # int64 [1]: the row the new token goes to
    kv_start: torch.Tensor  # int32 [B]: each sequence's first valid row (left padding)
    kv_end: torch.Tensor  # int32 [B]: one past its last valid row (write_pos + 1)


def captured_step(cache, layer_idx: int) -> CapturedStep | None:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    return getattr(layers[layer_idx], "step", None)


class LatentLayer(DynamicLayer):
    """One layer's latent cache in a growable packed buffer (see the module docstring)."""

    is_compileable = False  # it grows; use cache_implementation="static" to compile
    is_croppable = True
    is_sliding = False

    def __init__(self, initial_capacity: int = INITIAL_CAPACITY, **kwargs):
        super().__init__()
        self.initial_capacity = max(1, int(initial_capacity))
        self.buffer: torch.Tensor | None = None  # [B, 1, capacity, R + P]
        self.length = 0
        self.latent_dim = 0  # R = kv_lora_rank
        self.step: CapturedStep | None = None  # set only while graphs.py records or warms up a step
        self.allocate = None  # optional (shape, dtype, device) -> buffer, e.g. graphs.py's reusable buffers

    # -- storage -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or key_states.shape[1] != 1 or value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(
                "LatentCache stores MLA latents [B, 1, T, kv_lora_rank] and [B, 1, T, rope]; got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}. Use it only with MLA models."
            )
        if key_states.dtype != value_states.dtype:
            raise ValueError(f"LatentCache: c_kv {key_states.dtype} and k_pe {value_states.dtype} differ")
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.latent_dim = key_states.shape[-1]
        width = key_states.shape[-1] + value_states.shape[-1]
        capacity = max(self.initial_capacity, key_states.shape[-2])
        shape = (key_states.shape[0], 1, capacity, width)
        if self.allocate is not None:
            self.buffer = self.allocate(shape, self.dtype, self.device)
        else:
            self.buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.length = 0
        self.is_initialized = True
        self._refresh_views()

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[2]

    def _refresh_views(self) -> None:
        rows = self.buffer[:, :, : self.length]
        self.keys = rows[..., : self.latent_dim]
        self.values = rows[..., self.latent_dim :]

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= GROWTH_FACTOR
        grown = self.buffer.new_empty(*self.buffer.shape[:2], capacity, self.buffer.shape[-1])
        grown[:, :, : self.length].copy_(self.buffer[:, :, : self.length])
        self.buffer = grown

    def advance(self, tokens: int) -> None:
        """Count rows a replayed graph wrote (it cannot run this Python)."""
        self.length += tokens
        self._refresh_views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.step is not None:  # recording a captured step: the row and the length are device values
            row = torch.cat([key_states, value_states], dim=-1)
            self.buffer.index_copy_(2, self.step.write_pos, row)
            return self.buffer[..., : self.latent_dim], self.buffer[..., self.latent_dim :]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.buffer.shape[0]:
            raise ValueError(
                f"LatentCache: batch size changed from {self.buffer.shape[0]} to {key_states.shape[0]} "
                "between calls; start a new cache (or call cache.reset()) for a new batch"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(
                f"LatentCache: dtype changed from {self.dtype} to {key_states.dtype}/{value_states.dtype}; "
                "start a new cache for a new dtype"
            )
        new = key_states.shape[-2]
        end = self.length + new
        if end > self.capacity:
            self._grow(end)
        self.buffer[:, :, self.length : end, : self.latent_dim].copy_(key_states)
        self.buffer[:, :, self.length : end, self.latent_dim :].copy_(value_states)
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    # -- what transformers asks of a layer -----------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        """Forget the tokens; keep the buffer for the next generation of the same batch size."""
        self.length = 0
        if self.is_initialized:
            self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers' legacy form: the final length
            tokens_to_remove = tokens_to_remove - self.length
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            rows = self.buffer[:, :, : self.length]
            rows.copy_(rows.index_select(0, beam_idx.to(self.device)))
            self._refresh_views()

    def _replace_batch(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._replace_batch(self.buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._replace_batch(self.buffer[indices].contiguous())

    def offload(self):
        if self.is_initialized:
            self._replace_batch(self.buffer.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.buffer.device != self.device:
            self._replace_batch(self.buffer.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


class LatentCache(DynamicCache):
    """A DynamicCache whose layers are `LatentLayer`s; generate() gets one after `mla_patch.patch()`.

    Args:
        config: the model config (its layer count and types size the cache); optional.
        initial_capacity: tokens preallocated per layer at the first write (grown x2 when full).
    """

    def __init__(self, config=None, initial_capacity: int = INITIAL_CAPACITY, **kwargs):
        def new_layer() -> LatentLayer:  # config-less layers are made on first use: with this capacity too
            return LatentLayer(initial_capacity)

        if config is not None:
            # The layers DynamicCache would make for this config, full-attention ones made latent: hybrid
            # models (Kimi-Linear) keep their linear-attention state layers as transformers builds them.
            stock = DynamicCache(config=config).layers
            Cache.__init__(self, layers=[new_layer() if type(layer) is DynamicLayer else layer for layer in stock])
        else:
            Cache.__init__(self, layer_class_to_replicate=new_layer)

    def latent_layers(self) -> list[LatentLayer]:
        return [layer for layer in self.layers if isinstance(layer, LatentLayer)]

    def nbytes(self) -> int:
        """Bytes held by all layers' buffers (the whole capacity, not just the valid rows)."""
        return sum(layer.nbytes() for layer in self.latent_layers())
