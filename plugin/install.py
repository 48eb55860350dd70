#!/usr/bin/env python3
"""Installs the qwenclip node pack into a ComfyUI from a source checkout (needs Rust). Run it
with ComfyUI's own Python:

    python plugin/install.py --custom-nodes /path/to/ComfyUI/custom_nodes [--cuda]

1. builds the `qwenclip` Python package from this checkout (`pip install <checkout>`: cargo
   builds the library and the `qwenclip` command into a wheel; --cuda: the CUDA wheel,
   scripts/build-cuda.sh --wheel) and installs it into this Python;
2. links this package into custom_nodes/ as `comfyui-qwenclip` (or copies it, --copy);
3. loads the library the way the nodes will, and says which one they will use.

Without Rust, install the pack as ComfyUI-Manager does instead: put the pack in custom_nodes
and `pip install -r requirements.txt` (the qwenclip wheel carries the compiled library).
Restart ComfyUI afterwards. Options: --no-build links only (the qwenclip package must be
installed already); --name changes the folder name. Needs Python 3.9+, Rust
(https://rustup.rs) unless --no-build; the CUDA build also downloads NVIDIA's compiler wheels.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent


def pip_install(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print("install: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_and_install(cuda: bool) -> None:
    if not (REPO / "Cargo.toml").is_file():
        sys.exit(f"install: {REPO} is not the qwenclip repository (no Cargo.toml): use requirements.txt")
    if shutil.which("cargo") is None:
        sys.exit(
            "install: cargo was not found: install Rust from https://rustup.rs, or install the "
            f"prebuilt package: {sys.executable} -m pip install -r {PACKAGE / 'requirements.txt'}"
        )
    if cuda:
        dist = REPO / "target" / "wheels-cuda"
        subprocess.run(["bash", str(REPO / "scripts" / "build-cuda.sh"), "--wheel", str(dist)], check=True)
        pip_install(["--force-reinstall", "--no-deps", "--no-index", "--find-links", str(dist), "qwenclip"])
    else:
        pip_install(["--force-reinstall", "--no-deps", str(REPO)])


def link_package(custom_nodes: Path, name: str, copy: bool) -> Path:
    if not custom_nodes.is_dir():
        sys.exit(f"install: {custom_nodes} is not a folder (give ComfyUI's custom_nodes folder)")
    dest = custom_nodes / name
    if dest.is_symlink() or dest.exists():
        if dest.resolve() == PACKAGE and not copy:
            print(f"install: {dest} already links to {PACKAGE}")
            return dest
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif (dest / "nodes.py").is_file() and (dest / "library.py").is_file():
            shutil.rmtree(dest)  # an earlier copy of this pack
        else:
            sys.exit(f"install: {dest} exists and is not this node pack: remove it or use --name")
    if copy:
        shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        print(f"install: copied {PACKAGE} -> {dest}")
    else:
        try:
            os.symlink(PACKAGE, dest, target_is_directory=True)
            print(f"install: linked {dest} -> {PACKAGE}")
        except OSError as e:  # e.g. Windows without the symlink privilege
            print(f"install: cannot link ({e}); copying instead")
            shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def check() -> None:
    """Loads the library as the nodes will (in a child process: nothing stays loaded here)."""
    code = "import qwenclip; print(qwenclip.library().describe())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.anchor)
    if r.returncode != 0:
        sys.exit("install: the library does not load:\n" + (r.stderr.strip().splitlines() or ["?"])[-1])
    print(f"install: the nodes will use {r.stdout.strip()}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--custom-nodes", required=True, type=Path, help="ComfyUI's custom_nodes folder")
    ap.add_argument("--cuda", action="store_true", help="build and install the CUDA wheel")
    ap.add_argument("--no-build", action="store_true", help="link the pack only")
    ap.add_argument("--copy", action="store_true", help="copy the pack instead of linking it")
    ap.add_argument("--name", default="comfyui-qwenclip", help="folder name in custom_nodes")
    return ap


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    dest = link_package(a.custom_nodes.expanduser().resolve(), a.name, a.copy)
    if not a.no_build:
        build_and_install(a.cuda)
    check()
    print(
        f"install: done ({dest}). Restart ComfyUI; put Qwen3 models in models/text_encoders and "
        "adapters in models/qwenclip."
    )


if __name__ == "__main__":
    main()
