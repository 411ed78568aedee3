"""patch() / unpatch(): swap every MLA attention class of transformers for ours, and back.

For each family in `families.FAMILIES` we build once a subclass `Mla<Attention>` of the stock
class whose only change is `forward` (attention.MlaAttentionMixin). No parameter is added or
renamed, so checkpoints load and save unchanged, and isinstance checks of transformers (output
capture, hooks) still hold.
  - patch() rebinds the class name in its modeling module, so models built afterwards
    (from_pretrained, meta-device init) get our class.
  - patch(model) changes `__class__` of the attention modules already in `model`: in place,
    no weight copy.
  - Both make generate() start with a LatentCache when it would have made a DynamicCache.
unpatch() puts every class and every module we touched back as it was.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import types

import torch
import transformers
from transformers import DynamicCache
from transformers.generation.utils import GenerationMixin

from . import decode_fast_path, graphs, mtp, ops
from .attention import PATCHED_MODULES, MlaAttentionMixin
from .cache import CACHE_KWARG, LatentCache, capacity_for
from .families import FAMILIES, NOT_SERVED

logger = logging.getLogger("mla_patch")

BACKENDS = ("auto", "kernel", "torch")
ABSORB_MODES = ("per_head", "merged")
SUPPORTED_TRANSFORMERS = ((5, 17), (6, 0))  # [min, max)

_patched_classes: dict[str, type] = {}  # model_type -> Mla<Attention> subclass
_class_patches: dict[str, tuple] = {}  # model_type -> (modeling module, original class)
_generate_hooks: dict[type, dict] = {}  # pretrained class -> {hook name: previous __dict__ entry (or None)}


def _check_transformers() -> None:
    parts = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= parts < high):
        raise RuntimeError(
            f"mla_patch supports transformers >={low[0]}.{low[1]},<{high[0]}.{high[1]}; "
            f"found {transformers.__version__}"
        )


def _check_options(backend: str, absorb: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"mla_patch.patch: backend must be one of {BACKENDS}, got {backend!r}")
    if absorb not in ABSORB_MODES:
        raise ValueError(f"mla_patch.patch: absorb must be one of {ABSORB_MODES}, got {absorb!r}")


def _check_kernel_backend(model, backend: str) -> None:
    """backend="kernel" promises the CUDA kernel: say now, not at the first decode step, when it cannot be."""
    if backend != "kernel":
        return
    if ops.extension_error() is not None:
        raise RuntimeError(f"mla_patch.patch: backend='kernel' needs the CUDA extension: {ops.extension_error()}")
    devices = {p.device.type for p in model.parameters()} if model is not None else set()
    if devices - {"cuda", "meta"}:
        raise ValueError(f"mla_patch.patch: backend='kernel' needs the model on CUDA; its parameters are on "
                         f"{sorted(devices)} (use backend='auto' or 'torch', or move the model first)")


def _patched_class(family, original: type) -> type:
    """The Mla<Attention> subclass for this family, built once and importable (for pickling)."""
    cls = _patched_classes.get(family.model_type)
    if cls is None:
        forward = inspect.unwrap(original.forward)
        arg_names = [p for p in inspect.signature(forward).parameters if p not in ("self", "kwargs", "args")]
        name = f"Mla{original.__name__}"
        cls = type(
            name,
            (MlaAttentionMixin, original),
            {
                "__module__": __name__,
                "__qualname__": name,
                "_mla_family": family,
                "_mla_original_class": original,
                "_mla_arg_names": arg_names,
            },
        )
        globals()[name] = cls
        _patched_classes[family.model_type] = cls
    return cls


def _available_families(families):
    wanted = FAMILIES.keys() if families is None else [families] if isinstance(families, str) else families
    for model_type in wanted:
        if model_type in NOT_SERVED:
            raise ValueError(f"mla_patch: {model_type!r} is not served: {NOT_SERVED[model_type]}")
        if model_type not in FAMILIES:
            raise ValueError(f"mla_patch: unknown MLA family {model_type!r}; known: {sorted(FAMILIES)}")
        modeling = FAMILIES[model_type].load()
        if modeling is not None:
            yield FAMILIES[model_type], modeling


def _original_attention_class(family, modeling) -> type:
    current = getattr(modeling, family.attention_class)
    return current._mla_original_class if issubclass(current, MlaAttentionMixin) else current


# -- generate(): start with a LatentCache ---------------------------------------------------------


def _prepare_cache_with_latent(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
    before = model_kwargs.get(CACHE_KWARG)
    self.__dict__["_mla_decode_batch"] = batch_size  # for _decode_experts
    result = GenerationMixin._prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    )
    made = model_kwargs.get(CACHE_KWARG)
    # Only a DynamicCache that generate() itself just made; a user's cache is left alone.
    if before is None and type(made) is DynamicCache and not getattr(made, "offloading", False):
        if any(isinstance(m, MlaAttentionMixin) for m in self.modules()):
            # Sized for the whole generation, so it never grows; on CUDA its buffers are lent by the model's
            # captured decode steps, so the next generate() of the same shape replays them again.
            cache = LatentCache(config=self.config, initial_capacity=capacity_for(max_cache_length + 1))
            if graphs.model_unsupported_reason(self) is None:
                graphs.graphs_of(self).lend_buffers(cache)
            model_kwargs[CACHE_KWARG] = cache
    return result


def _decode_graphs_apply(self, model_kwargs, generation_config):
    """generate()'s question "may the decode step be swapped for a faster call?": yes for a LatentCache
    on one CUDA device (our captured steps) unless disable_compile; transformers decides for the rest."""
    if isinstance(model_kwargs.get(CACHE_KWARG), LatentCache):
        return not generation_config.disable_compile and graphs.model_unsupported_reason(self) is None
    return GenerationMixin._valid_auto_compile_criteria(self, model_kwargs, generation_config)


def _graphed_decode_call(self, compile_config):
    return graphs.GraphedDecode(self, compile_config)


# transformers decodes MoE layers with batched_mm, which copies each picked expert's weights per token; from
# this many sequences grouped_mm (each picked expert read once) was the faster in every captured step measured
# (DeepSeek-V2-Lite shape on an H200, its step time with batched_mm over grouped_mm: 0.96 at batch 1, 1.10 at 2,
# 1.29 at 4, 1.64 at 8, 2.2 at 16, 6.1 at 64; docs/BENCHMARKS.md).
GROUPED_MM_FROM_BATCH = 2


@contextlib.contextmanager
def _decode_experts(self):
    """transformers' decode-time experts switch, then grouped_mm back for batches of GROUPED_MM_FROM_BATCH
    and more (the batch is generate()'s, noted when its cache was prepared)."""
    with GenerationMixin._optimize_model_for_decode(self):
        current = self.get_experts_implementation() if hasattr(self, "get_experts_implementation") else {}
        grouped = None
        if "batched_mm" in current.values() and self.__dict__.get("_mla_decode_batch", 1) >= GROUPED_MM_FROM_BATCH:
            grouped = {key: "grouped_mm" if value == "batched_mm" else value for key, value in current.items()}
        with graphs.experts_as(self, grouped):
            yield


# What patch() sets on a model class for generate(), and the methods they replace.
_GENERATE_HOOKS = {
    "_prepare_cache_for_generation": _prepare_cache_with_latent,
    "_valid_auto_compile_criteria": _decode_graphs_apply,
    "get_compiled_call": _graphed_decode_call,
    "_optimize_model_for_decode": _decode_experts,
}


def _set_class(module, cls: type) -> None:
    """Switch a module's class; also the forward accelerate's hooks saved (device_map, offload).

    accelerate wraps `module.forward` and calls the forward bound at hook time, `module._old_forward`:
    without rebinding it, a model dispatched before patch(model) would keep running the old class.
    """
    module.__class__ = cls
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        module._old_forward = types.MethodType(cls.forward, module)


def _install_generate_hook(cls: type) -> None:
    if cls not in _generate_hooks:
        _generate_hooks[cls] = {name: cls.__dict__.get(name) for name in _GENERATE_HOOKS}
        for name, hook in _GENERATE_HOOKS.items():
            setattr(cls, name, hook)


def _remove_generate_hooks() -> None:
    for cls, previous in _generate_hooks.items():
        for name, method in previous.items():
            if method is None:
                delattr(cls, name)
            else:
                setattr(cls, name, method)
    _generate_hooks.clear()


def _patch_modules(model, families, backend: str, absorb: str) -> int:
    """Switch `model`'s MLA attention modules of the served families to our classes; how many."""
    count = 0
    for family, modeling in _available_families(families):
        original = _original_attention_class(family, modeling)
        for module in model.modules():
            if isinstance(module, original):
                _set_class(module, _patched_class(family, original))
                module.mla_backend, module.mla_absorb = backend, absorb
                PATCHED_MODULES.add(module)
                count += 1
    return count


def _patch_draft_like_main(draft, main_model) -> None:
    """The MTP draft model of a model patched in place gets its layers patched with the same options."""
    ours = next((m for m in main_model.modules() if isinstance(m, MlaAttentionMixin)), None)
    if ours is not None and not any(isinstance(m, MlaAttentionMixin) for m in draft.modules()):
        _patch_modules(draft, [ours._mla_family.model_type], ours.mla_backend, ours.mla_absorb)


# -- public entry points ----------------------------------------------------------------------------


def patch(model=None, *, backend: str = "auto", absorb: str = "per_head", families=None) -> dict:
    """Patch MLA attention for absorbed decode; returns what `status()` reports.

    Args:
        model: None to patch the transformers classes (call before from_pretrained), or a
            loaded model to patch in place.
        backend: decode attention: "auto" (CUDA kernel where it can serve, else PyTorch, the
            reason logged once), "kernel" (error if it cannot serve) or "torch".
        absorb: "per_head" (W_UK, W_UV as views of kv_b_proj) or "merged" (materialized
            W_UQ.W_UK and W_UV.W_O, more memory).
        families: model_type names to patch (default: all in `families.FAMILIES`).
    """
    _check_transformers()
    _check_options(backend, absorb)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"mla_patch.patch: model must be a loaded model (torch.nn.Module) or None, got {type(model).__name__}")
    _check_kernel_backend(model, backend)
    if model is None:
        for family, modeling in _available_families(families):
            original = _original_attention_class(family, modeling)
            cls = _patched_class(family, original)
            cls._mla_new_options = (backend, absorb)  # for layers built from now on; live ones keep theirs
            setattr(modeling, family.attention_class, cls)
            _class_patches[family.model_type] = (modeling, original)
            _install_generate_hook(getattr(modeling, family.pretrained_class))
        decode_fast_path.install()
        return status()

    count = _patch_modules(model, families, backend, absorb)
    if count:
        decode_fast_path.install()
        mtp.install(_patch_draft_like_main)
    if count and hasattr(model, "generate"):
        _install_generate_hook(type(model))
    elif count == 0:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        why = NOT_SERVED.get(model_type, "no MLA attention layer of a served family")
        logger.warning("mla_patch: %s (%s): %s; left untouched", type(model).__name__, model_type, why)
    return status(model)


def unpatch(model=None) -> None:
    """Restore the stock classes, generate(), and every module patch(model) changed.

    With a model, also turn any of its layers that were built as our class back into the stock class, and
    free its captured decode steps and the cache buffers they kept.
    """
    for modeling, original in _class_patches.values():
        setattr(modeling, original.__name__, original)
    _class_patches.clear()
    _remove_generate_hooks()
    decode_fast_path.uninstall()
    mtp.uninstall()
    modules = list(PATCHED_MODULES) + (list(model.modules()) if model is not None else [])
    for module in modules:
        if isinstance(module, MlaAttentionMixin):
            _set_class(module, module._mla_original_class)
            for attr in ("mla_backend", "mla_absorb", "_mla_merged"):
                module.__dict__.pop(attr, None)
    PATCHED_MODULES.clear()
    if model is not None:
        for attr in ("_mla_decode_graphs", "_mla_decode_batch"):
            model.__dict__.pop(attr, None)


def status(model=None) -> dict:
    """What is patched and which decode backend will run, with the reason when it is not the kernel."""
    kernel_error = ops.extension_error()
    cuda = torch.cuda.is_available()
    if kernel_error is None and cuda:
        decode = "kernel (bf16/fp16 on CUDA with supported dims; the PyTorch reference otherwise)"
    else:
        decode = "torch reference: " + (kernel_error or "no CUDA device")
    report = {
        "transformers": transformers.__version__,
        "patched_classes": sorted(f"{m.__name__}.{o.__name__}" for m, o in _class_patches.values()),
        "decode_backend": decode,
        "kernel_available": kernel_error is None,
    }
    if model is not None:
        layers = [m for m in model.modules() if isinstance(m, MlaAttentionMixin)]
        classes = {f"{m._mla_original_class.__module__}.{m._mla_original_class.__name__}" for m in layers}
        report["patched_classes"] = sorted(set(report["patched_classes"]) | classes)
        report["patched_layers"] = len(layers)
        report["layer_options"] = sorted({(m.mla_backend, m.mla_absorb) for m in layers})
        report["generate_decode"] = _generate_decode_path(model) if layers else "stock (nothing patched)"
    return report


def _generate_decode_path(model) -> str:
    """How generate() runs this model's decode steps by default."""
    reason = graphs.model_unsupported_reason(model)
    if reason is not None:
        return f"eager: {reason}"
    held = graphs.graphs_of(model)
    return (f"CUDA graphs captured by mla_patch, one per batch size and cache capacity ({len(held.captured)} held "
            f"with {held.buffer_bytes() / 2**30:.2f} GiB of cache buffers, freed by unpatch(model); {held.replays} "
            "replays; generate(..., disable_compile=True) runs eagerly)")
