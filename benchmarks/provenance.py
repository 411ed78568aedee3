"""What a result file records about the code that produced it."""

from __future__ import annotations

import os
import subprocess


def commit() -> str:
    """The short commit: MLA_PATCH_COMMIT where set (the device's copy of the tree has no .git), else git's,
    else '?'."""
    if os.environ.get("MLA_PATCH_COMMIT"):
        return os.environ["MLA_PATCH_COMMIT"]
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False)
    except OSError:
        return "?"
    return git.stdout.strip() or "?"
