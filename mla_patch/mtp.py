"""generate(use_mtp=True) after patch(model): the draft model transformers builds from a patched model is patched too.

At each generate(use_mtp=True) transformers builds an MtpModel whose layers are instances of the main model's last
decoder layer class; that layer builds its attention from the modeling module's class. patch() before from_pretrained
replaces that class, so the draft layers come out patched; patch(model) on a loaded model does not, so without this
hook the drafts would run stock. Once the MtpModel has tied itself to the main model, its MLA attention modules take
the class and options of the main model's patched ones.
"""

from __future__ import annotations

import functools

_installed: dict[str, tuple[type, object]] = {}  # attribute -> (MtpModel, transformers' method)


def install(patch_draft_like_main) -> None:
    """Wrap MtpModel.tie_with_main_model (idempotent); nothing where transformers has no MTP.

    `patch_draft_like_main(draft, main_model)` patches the draft's MLA layers as the main model's are.
    """
    try:
        from transformers.modeling_layers import MtpModel
    except ImportError:
        return
    if _installed or "tie_with_main_model" not in MtpModel.__dict__:
        return
    original = MtpModel.__dict__["tie_with_main_model"]

    @functools.wraps(original)
    def tie_with_main_model(self, main_model):
        original(self, main_model)
        patch_draft_like_main(self, main_model)

    _installed["tie_with_main_model"] = (MtpModel, original)
    MtpModel.tie_with_main_model = tie_with_main_model


def uninstall() -> None:
    for name, (owner, original) in _installed.items():
        setattr(owner, name, original)
    _installed.clear()
