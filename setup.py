"""The Rust half of the `qwenclip` wheel (metadata is in pyproject.toml).

- the shared library as `qwenclip/_lib.abi3.so`: a plain cdylib the package loads with ctypes
  (setuptools-rust's NoBinding), tagged abi3 since it uses no Python C API;
- the `qwenclip` command as the wheel's script (setuptools-rust's RustBin), installed beside
  the interpreter (venv/bin).

Both are stripped (symbols and debug info; the library's exported C functions stay in its
dynamic symbol table), which keeps the wheel small whatever the cargo profile.

Environment: QWENCLIP_FEATURES (cargo features, e.g. "cuda": scripts/build-cuda.sh --wheel),
QWENCLIP_LOCAL_VERSION (a local version tag, e.g. "cu130": the CUDA wheel is qwenclip
0.1.0+cu130, so `pip install` of either satisfies the node pack's `qwenclip` requirement),
SETUPTOOLS_RUST_CARGO_PROFILE (a cargo profile other than release, e.g. "dev" locally).
"""

import os
import re
from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustBin, RustExtension, Strip

ROOT = Path(__file__).resolve().parent


def version() -> str:
    """The crate's version (Cargo.toml is the one place it is written), plus the local tag."""
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    local = os.environ.get("QWENCLIP_LOCAL_VERSION", "").strip()
    return m.group(1) + (f"+{local}" if local else "")


features = [f for f in re.split(r"[,\s]+", os.environ.get("QWENCLIP_FEATURES", "")) if f]

setup(
    version=version(),
    rust_extensions=[
        RustExtension(
            "qwenclip._lib",
            path="Cargo.toml",
            binding=Binding.NoBinding,
            py_limited_api=True,
            features=features,
            args=["--locked"],
            strip=Strip.All,
        ),
        RustBin("qwenclip", path="Cargo.toml", features=features, args=["--locked"], strip=Strip.All),
    ],
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
