"""ctypes bindings to the qwenclip shared library (include/qwenclip.h).

Nothing here runs at import: `get()` finds and loads the library on first use and caches the
result (or the reason it failed). Search order:

1. `QWENCLIP_LIB`: a library file, or a folder holding one (only that place is tried);
2. this package's own `lib/` folder (where `install.py` copies the build);
3. the repository's `target/release/`, then `target/debug/` (a package linked from a checkout).

In each place a CUDA build (`libqwenclip_cuda.so`) is preferred when it is there, loads, reports
CUDA support and `torch.cuda.is_available()`; otherwise the CPU build (`libqwenclip.so`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("qwenclip")

ABI_VERSION = 2
CAP_CPU = 1
CAP_CUDA = 2

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent

STATUS_NAMES = {
    0: "OK",
    1: "NULL_ARGUMENT",
    2: "INVALID_UTF8",
    3: "INVALID_ARGUMENT",
    4: "BUFFER_SIZE",
    5: "INVALID_HANDLE",
    6: "FILE_ERROR",
    7: "MISMATCH",
    8: "NON_FINITE",
    9: "PANIC",
    10: "FAILED",
}
NON_FINITE = 8


class QwenclipError(RuntimeError):
    """A library call failed; `status` is the qwenclip_status code."""

    def __init__(self, what: str, status: int, message: str):
        self.status = status
        self.message = message
        name = STATUS_NAMES.get(status, str(status))
        super().__init__(f"qwenclip {what} failed ({name}): {message}")


class LibraryMissing(RuntimeError):
    """No usable library was found: the message says where we looked and how to install."""


def _lib_names(cuda: bool) -> list[str]:
    stem = "qwenclip_cuda" if cuda else "qwenclip"
    if sys.platform == "win32":
        return [f"{stem}.dll"]
    if sys.platform == "darwin":
        return [f"lib{stem}.dylib"]
    return [f"lib{stem}.so"]


def search_places() -> list[Path]:
    """Folders searched, in order (without QWENCLIP_LIB)."""
    places = [PACKAGE_DIR / "lib"]
    if (REPO_DIR / "Cargo.toml").is_file():
        places += [REPO_DIR / "target" / "release", REPO_DIR / "target" / "debug"]
    return places


def install_hint() -> str:
    return (
        "Build and install it with one command: "
        f"`python {PACKAGE_DIR / 'install.py'} --custom-nodes <ComfyUI>/custom_nodes` "
        "(needs a Rust toolchain; add --cuda for the CUDA build), "
        "or set QWENCLIP_LIB to the path of libqwenclip.so and restart ComfyUI."
    )


def _cuda_wanted() -> bool:
    if os.environ.get("QWENCLIP_NO_CUDA"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: the CPU build is the safe choice
        return False


class _StepReport(ctypes.Structure):
    _fields_ = [
        ("loss", ctypes.c_double),
        ("loss_embeds", ctypes.c_double),
        ("loss_pooled", ctypes.c_double),
        ("grad_norm", ctypes.c_double),
        ("optimizer_stepped", ctypes.c_uint8),
        ("step", ctypes.c_uint64),
        ("lr_lora", ctypes.c_double),
        ("lr_resampler", ctypes.c_double),
    ]


class _Memory(ctypes.Structure):
    _fields_ = [("cpu_bytes", ctypes.c_uint64), ("cuda_bytes", ctypes.c_uint64)]


_u64 = ctypes.c_uint64
_size = ctypes.c_size_t
_str = ctypes.c_char_p
_fptr = ctypes.c_void_p  # float buffers are passed as raw addresses (torch data_ptr)


class Library:
    """One loaded library. Methods raise QwenclipError with the library's message."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # candle's CPU workers spin 25 000 times after every op before parking, taking a
        # core from the BLAS work that follows; 1000 measured ~10% faster CPU training and
        # ~5% faster encoding (the CLI sets the same). Read once, when the library first
        # runs a CPU op; a value the user set is kept.
        os.environ.setdefault("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000")
        lib = ctypes.CDLL(str(self.path))
        self._lib = lib
        sig = {
            "qwenclip_last_error": ([], _str),
            "qwenclip_version": ([], _str),
            "qwenclip_abi_version": ([], ctypes.c_uint32),
            "qwenclip_capabilities": ([], ctypes.c_uint32),
            "qwenclip_memory_report": ([ctypes.POINTER(_Memory)], ctypes.c_int),
            "qwenclip_release_memory": ([], ctypes.c_int),
            "qwenclip_encoder_load": ([_str, ctypes.POINTER(_u64)], ctypes.c_int),
            "qwenclip_encoder_free": ([_u64], ctypes.c_int),
            "qwenclip_encoder_load_adapter": ([_u64, _str], ctypes.c_int),
            "qwenclip_encoder_offload": ([_u64], ctypes.c_int),
            "qwenclip_encoder_output_shape": (
                [_u64, ctypes.POINTER(_size), ctypes.POINTER(_size), ctypes.POINTER(_size)],
                ctypes.c_int,
            ),
            "qwenclip_encode": (
                [_u64, ctypes.POINTER(_str), _size, _fptr, _size, _fptr, _size],
                ctypes.c_int,
            ),
            "qwenclip_trainer_new": ([_u64, _str, ctypes.POINTER(_u64)], ctypes.c_int),
            "qwenclip_trainer_load": ([_u64, _str, ctypes.POINTER(_u64)], ctypes.c_int),
            "qwenclip_trainer_step": (
                [_u64, ctypes.POINTER(_str), _size, _fptr, _size, _fptr, _size,
                 ctypes.POINTER(_StepReport)],
                ctypes.c_int,
            ),
            "qwenclip_trainer_save": ([_u64, _str], ctypes.c_int),
            "qwenclip_trainer_save_adapter": ([_u64, _str], ctypes.c_int),
            "qwenclip_trainer_free": ([_u64], ctypes.c_int),
        }
        for name, (args, res) in sig.items():
            f = getattr(lib, name)  # AttributeError: not a qwenclip library
            f.argtypes = args
            f.restype = res
        abi = lib.qwenclip_abi_version()
        if abi != ABI_VERSION:
            raise OSError(f"C interface version {abi}, this node pack needs {ABI_VERSION}")
        self.version = lib.qwenclip_version().decode()
        self.capabilities = int(lib.qwenclip_capabilities())

    @property
    def has_cuda(self) -> bool:
        return bool(self.capabilities & CAP_CUDA)

    def describe(self) -> str:
        kind = "CUDA" if self.has_cuda else "CPU"
        return f"qwenclip {self.version} ({kind} build) from {self.path}"

    # -- calls --------------------------------------------------------------------------

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self._lib.qwenclip_last_error()
            raise QwenclipError(what, status, msg.decode("utf-8", "replace") if msg else "")

    @staticmethod
    def _prompts(prompts):
        enc = [p.encode("utf-8") for p in prompts]
        return (_str * len(enc))(*enc), len(enc)

    def memory(self) -> dict:
        m = _Memory()
        self._check(self._lib.qwenclip_memory_report(ctypes.byref(m)), "memory report")
        return {"cpu_bytes": int(m.cpu_bytes), "cuda_bytes": int(m.cuda_bytes)}

    def release_memory(self) -> None:
        self._check(self._lib.qwenclip_release_memory(), "release memory")

    def encoder_load(self, config: dict) -> int:
        h = _u64()
        cfg = json.dumps(config).encode()
        self._check(self._lib.qwenclip_encoder_load(cfg, ctypes.byref(h)), "encoder load")
        return h.value

    def encoder_free(self, handle: int) -> None:
        self._check(self._lib.qwenclip_encoder_free(handle), "encoder free")

    def encoder_load_adapter(self, handle: int, adapter_dir: str | None) -> None:
        arg = None if adapter_dir is None else str(adapter_dir).encode()
        self._check(self._lib.qwenclip_encoder_load_adapter(handle, arg), "adapter load")

    def encoder_offload(self, handle: int) -> None:
        self._check(self._lib.qwenclip_encoder_offload(handle), "encoder offload")

    def output_shape(self, handle: int) -> tuple[int, int, int]:
        s, e, p = _size(), _size(), _size()
        self._check(
            self._lib.qwenclip_encoder_output_shape(
                handle, ctypes.byref(s), ctypes.byref(e), ctypes.byref(p)
            ),
            "output shape",
        )
        return s.value, e.value, p.value

    def encode_into(self, handle, prompts, embeds_ptr, embeds_len, pooled_ptr, pooled_len):
        """Encodes into caller buffers given as addresses + sizes in floats."""
        arr, n = self._prompts(prompts)
        self._check(
            self._lib.qwenclip_encode(handle, arr, n, embeds_ptr, embeds_len, pooled_ptr, pooled_len),
            "encode",
        )

    def trainer_new(self, encoder: int, config: dict | None) -> int:
        h = _u64()
        cfg = None if config is None else json.dumps(config).encode()
        self._check(self._lib.qwenclip_trainer_new(encoder, cfg, ctypes.byref(h)), "trainer new")
        return h.value

    def trainer_load(self, encoder: int, checkpoint: str) -> int:
        h = _u64()
        self._check(
            self._lib.qwenclip_trainer_load(encoder, str(checkpoint).encode(), ctypes.byref(h)),
            "trainer load",
        )
        return h.value

    def trainer_step(self, handle, prompts, embeds_ptr, embeds_len, pooled_ptr, pooled_len) -> dict:
        arr, n = self._prompts(prompts)
        r = _StepReport()
        self._check(
            self._lib.qwenclip_trainer_step(
                handle, arr, n, embeds_ptr, embeds_len, pooled_ptr, pooled_len, ctypes.byref(r)
            ),
            "trainer step",
        )
        return {name: getattr(r, name) for name, _ in _StepReport._fields_}

    def trainer_save(self, handle: int, path: str) -> None:
        self._check(self._lib.qwenclip_trainer_save(handle, str(path).encode()), "trainer save")

    def trainer_save_adapter(self, handle: int, folder: str) -> None:
        self._check(
            self._lib.qwenclip_trainer_save_adapter(handle, str(folder).encode()), "adapter save"
        )

    def trainer_free(self, handle: int) -> None:
        self._check(self._lib.qwenclip_trainer_free(handle), "trainer free")


_lock = threading.Lock()
_loaded: Library | None = None
_failure: str | None = None


def _try(path: Path, tried: list[str]) -> Library | None:
    if not path.is_file():
        return None
    try:
        return Library(path)
    except (OSError, AttributeError) as e:
        tried.append(f"{path}: {e}")
        return None


def find() -> Library:
    """Finds and loads the library (no caching; see `get`)."""
    tried: list[str] = []
    env = os.environ.get("QWENCLIP_LIB")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise LibraryMissing(f"qwenclip: QWENCLIP_LIB={env} does not exist. " + install_hint())
        places = [p]
        if p.is_file():
            lib = _try(p, tried)
            if lib is not None:
                return lib
            raise LibraryMissing(
                f"qwenclip: QWENCLIP_LIB={env} could not be loaded ({'; '.join(tried)}). "
                + install_hint()
            )
    else:
        places = search_places()
    want_cuda = _cuda_wanted()
    looked = []
    for place in places:
        if want_cuda:
            for name in _lib_names(cuda=True):
                looked.append(str(place / name))
                lib = _try(place / name, tried)
                if lib is not None and lib.has_cuda:
                    return lib
        for name in _lib_names(cuda=False):
            looked.append(str(place / name))
            lib = _try(place / name, tried)
            if lib is not None:
                return lib
        if not want_cuda:
            # A CUDA build also runs on the CPU: take it when it is all there is.
            for name in _lib_names(cuda=True):
                lib = _try(place / name, tried)
                if lib is not None:
                    return lib
    detail = f" Some failed to load: {'; '.join(tried)}." if tried else ""
    raise LibraryMissing(
        "qwenclip: the qwenclip library was not found (looked for "
        + ", ".join(looked)
        + ")."
        + detail
        + " "
        + install_hint()
    )


def get() -> Library:
    """The loaded library; raises LibraryMissing (same message every time) if there is none."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            if _failure is not None:
                raise LibraryMissing(_failure)
            try:
                _loaded = find()
            except LibraryMissing as e:
                _failure = str(e)
                log.error("%s", _failure)
                raise
            log.info("qwenclip: using %s", _loaded.describe())
    return _loaded


def loaded() -> Library | None:
    """The library if it was loaded already (never loads it)."""
    return _loaded


def reset() -> None:
    """Forgets the cached result (tests)."""
    global _loaded, _failure
    with _lock:
        _loaded = None
        _failure = None
