"""Where the pack gets the qwenclip Python package (the compiled library and its API, a
dependency in requirements.txt). Imported on first use, so the pack loads in milliseconds and
a missing package or library is one clear message when a node runs, not an import failure."""

from __future__ import annotations

import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent


class LibraryMissing(RuntimeError):
    """The qwenclip package or its library is missing: the message says how to install it."""


def install_hint() -> str:
    return (
        f"Install it into ComfyUI's Python: `{sys.executable} -m pip install -r "
        f"{PACK_DIR / 'requirements.txt'}` (ComfyUI-Manager does this when it installs the pack), "
        "then restart ComfyUI. From a source checkout with Rust: "
        f"`python {PACK_DIR / 'install.py'} --custom-nodes <ComfyUI>/custom_nodes`."
    )


def package():
    """The `qwenclip` module; LibraryMissing when it is not installed."""
    try:
        import qwenclip
    except ImportError as e:
        raise LibraryMissing(
            f"qwenclip: the qwenclip Python package is not installed in this Python ({e}). " + install_hint()
        ) from None
    return qwenclip


def get():
    """The loaded library (`qwenclip.Library`); LibraryMissing (same message every time) when
    the package or its library cannot be had."""
    qwenclip = package()
    try:
        return qwenclip.library()
    except qwenclip.LibraryMissing as e:
        raise LibraryMissing(f"{e} {install_hint()}") from None


def loaded():
    """The library if it was loaded already (never imports or loads anything)."""
    mod = sys.modules.get("qwenclip")
    return None if mod is None else mod.loaded_library()
