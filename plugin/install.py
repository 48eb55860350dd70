#!/usr/bin/env python3
"""Installs the qwenclip node pack into a ComfyUI, in one step:

    python plugin/install.py --custom-nodes /path/to/ComfyUI/custom_nodes [--cuda]

1. builds the library (`cargo build --release --lib`, with `--features cuda` for --cuda)
   and puts it in this package's lib/ folder (libqwenclip.so, or libqwenclip_cuda.so);
2. links this package into custom_nodes/ as `comfyui-qwenclip` (or copies it, --copy);
3. loads the library the way the nodes will, and says which one they will use.

Restart ComfyUI afterwards. Options: --library FILE installs a library built elsewhere
instead of building; --no-build links only (the nodes then find target/release or
target/debug of this checkout, or QWENCLIP_LIB); --name changes the folder name.
Needs Python 3.9+, and Rust (https://rustup.rs) unless --library or --no-build is given; the
CUDA build also needs the CUDA toolkit (nvcc).
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
SUFFIX = {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")


def lib_file(cuda: bool) -> str:
    stem = "qwenclip_cuda" if cuda else "qwenclip"
    return f"{stem}{SUFFIX}" if sys.platform == "win32" else f"lib{stem}{SUFFIX}"


def build(cuda: bool) -> Path:
    if not (REPO / "Cargo.toml").is_file():
        sys.exit(f"install: {REPO} is not the qwenclip repository (no Cargo.toml): use --library FILE")
    if shutil.which("cargo") is None:
        sys.exit("install: cargo was not found: install Rust from https://rustup.rs, or use --library FILE")
    cmd = ["cargo", "build", "--release", "--lib"]
    target = REPO / "target"
    if cuda:
        target = REPO / "target" / "cuda"  # keep the CPU build beside it
        cmd += ["--features", "cuda", "--target-dir", str(target)]
    print("install: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    built = target / "release" / lib_file(False)
    if not built.is_file():
        sys.exit(f"install: the build did not produce {built}")
    return built


def install_library(src: Path, dest_pkg: Path, cuda: bool) -> Path:
    lib_dir = dest_pkg / "lib"
    lib_dir.mkdir(exist_ok=True)
    dest = lib_dir / lib_file(cuda)
    tmp = dest.with_suffix(".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)  # atomic: a running ComfyUI keeps its mapped copy
    print(f"install: library -> {dest}")
    return dest


def link_package(custom_nodes: Path, name: str, copy: bool) -> Path:
    if not custom_nodes.is_dir():
        sys.exit(f"install: {custom_nodes} is not a folder (give ComfyUI's custom_nodes folder)")
    dest = custom_nodes / name
    kept_lib = None
    if dest.is_symlink() or dest.exists():
        if dest.resolve() == PACKAGE and not copy:
            print(f"install: {dest} already links to {PACKAGE}")
            return dest
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif (dest / "nodes.py").is_file() and (dest / "library.py").is_file():
            if (dest / "lib").is_dir():  # an earlier copy: keep its library
                kept_lib = custom_nodes / f".{name}-lib"
                shutil.rmtree(kept_lib, ignore_errors=True)
                os.replace(dest / "lib", kept_lib)
            shutil.rmtree(dest)
        else:
            sys.exit(f"install: {dest} exists and is not this node pack: remove it or use --name")
    if copy:
        shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if kept_lib is not None:
            shutil.rmtree(dest / "lib", ignore_errors=True)
            os.replace(kept_lib, dest / "lib")
        print(f"install: copied {PACKAGE} -> {dest}")
    else:
        try:
            os.symlink(PACKAGE, dest, target_is_directory=True)
            print(f"install: linked {dest} -> {PACKAGE}")
        except OSError as e:  # e.g. Windows without the symlink privilege
            print(f"install: cannot link ({e}); copying instead")
            shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def check(pkg: Path) -> None:
    """Loads the library as the nodes will (in a child process: nothing stays loaded here)."""
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('qwenclip_install_check', {str(pkg / 'library.py')!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "print(m.find().describe())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("install: the library does not load:\n" + (r.stderr.strip().splitlines() or ["?"])[-1])
    print(f"install: the nodes will use {r.stdout.strip()}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--custom-nodes", required=True, type=Path, help="ComfyUI's custom_nodes folder")
    ap.add_argument("--cuda", action="store_true", help="build (or install) the CUDA library")
    ap.add_argument("--library", type=Path, help="install this library file instead of building")
    ap.add_argument("--no-build", action="store_true", help="link the package only")
    ap.add_argument("--copy", action="store_true", help="copy the package instead of linking it")
    ap.add_argument("--name", default="comfyui-qwenclip", help="folder name in custom_nodes")
    return ap


def main(argv=None) -> None:
    a = parser().parse_args(argv)

    dest = link_package(a.custom_nodes.expanduser().resolve(), a.name, a.copy)
    if a.library or not a.no_build:
        src = a.library.expanduser().resolve() if a.library else build(a.cuda)
        if not src.is_file():
            sys.exit(f"install: {src} does not exist")
        install_library(src, dest.resolve() if dest.is_symlink() else dest, a.cuda)
    check(dest.resolve() if dest.is_symlink() else dest)
    print(
        "install: done. Restart ComfyUI; put Qwen3 models in models/text_encoders and adapters in models/qwenclip."
    )


if __name__ == "__main__":
    main()
