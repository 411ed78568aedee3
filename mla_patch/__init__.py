"""mla_patch: absorbed Multi-head Latent Attention decode for HuggingFace transformers.

    import mla_patch; mla_patch.patch()      # before from_pretrained
    mla_patch.patch(model)                   # or on a loaded model, in place

Importing this package compiles nothing and loads no extension; the CUDA kernel is loaded on
first use (see `mla_patch.status()`).
"""

from .attention import DECODE_MAX_NEW_TOKENS, decode_stats, reset_decode_stats
from .cache import CACHE_KWARG, LatentCache
from .ops import mla_decode
from .patch import patch, status, unpatch
from .reference import mla_decode_ref

__version__ = "0.1.0"

__all__ = [
    "CACHE_KWARG",
    "DECODE_MAX_NEW_TOKENS",
    "LatentCache",
    "decode_stats",
    "mla_decode",
    "mla_decode_ref",
    "patch",
    "reset_decode_stats",
    "status",
    "unpatch",
]
