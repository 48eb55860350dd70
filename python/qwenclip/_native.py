"""ctypes bindings to the qwenclip shared library (include/qwenclip.h, docs/c-api.md).

Nothing here runs at import: `get()` finds and loads the library on first use and caches the
result (or the reason it failed). Search order:

1. `QWENCLIP_LIB`: a library file, or a folder holding one (only that place is tried);
2. the library this package was installed with (`qwenclip/_lib.abi3.so`, from the wheel);
3. from a source checkout (python/ beside Cargo.toml): `target/release/`, then `target/debug/`.

In a folder a CUDA build (`libqwenclip_cuda.so`) is preferred when it loads and both it and
torch see CUDA; otherwise the CPU build (`libqwenclip.so`). A wheel carries one build: the
CPU wheel (`qwenclip`) or the CUDA one (`qwenclip==X+cu130`, scripts/build-cuda.sh --wheel).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import platform
import re
import sys
import threading
from pathlib import Path

log = logging.getLogger("qwenclip")

ABI_VERSION = 2
CAP_CPU = 1
CAP_CUDA = 2

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent.parent

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


def _non_finite(value, path: str = ""):
    """The first NaN or infinity in a JSON-bound value, as (path, value), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "value", value
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, (list, tuple))
        else ()
    )
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _json_arg(value, what: str) -> bytes:
    """JSON for the library. JSON has no NaN or infinity: such a setting is refused here,
    naming it, rather than sent as text the library cannot read."""
    bad = _non_finite(value)
    if bad:
        raise ValueError(f"{what}: {bad[0]} is {bad[1]}; it must be a finite number")
    return json.dumps(value).encode()


class QwenclipError(RuntimeError):
    """A library call failed; `status` is the qwenclip_status code, `message` the library's."""

    def __init__(self, what: str, status: int, message: str):
        self.status = status
        self.message = message
        name = STATUS_NAMES.get(status, str(status))
        super().__init__(f"qwenclip {what} failed ({name}): {message}")


class LibraryMissing(RuntimeError):
    """No usable library: the message says what is missing and how to get it."""


def package_version() -> str:
    """The installed distribution's version ("0.1.0", "0.1.0+cu130"), or "" from a checkout."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("qwenclip")
    except (ImportError, PackageNotFoundError):
        return ""


def install_hint() -> str:
    return (
        "Install the library with `python -m pip install qwenclip` (or a qwenclip wheel file) "
        f"into this Python ({sys.executable}), or build it from a source checkout with "
        "`pip install <checkout>` (needs Rust), or set QWENCLIP_LIB to the path of a "
        "libqwenclip.so."
    )


def _cpu_wheel_hint() -> str:
    base = package_version().split("+")[0]
    pin = f"=={base}" if base else ""
    return f"or install the CPU build: `python -m pip install --force-reinstall --no-deps 'qwenclip{pin}'`"


_CUDA_LIBS = ("libcuda.", "libcudart", "libcublas", "libcurand", "libnvrtc", "libcudnn")


def explain_load_failure(path: Path, err: OSError) -> str:
    """One sentence on why `path` did not load (the loader's text is not enough for artists):
    a missing CUDA library, a glibc too old, or the loader's own words."""
    text = str(err)
    missing = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", text)
    if missing and missing.group(1).startswith(_CUDA_LIBS):
        return (
            f"{path} is the CUDA build of qwenclip and this machine lacks {missing.group(1)} "
            "(the NVIDIA driver and the CUDA 13 runtime): install them, " + _cpu_wheel_hint()
        )
    glibc = re.search(r"GLIBC_([0-9.]+)' not found", text)
    if glibc:
        have = platform.libc_ver()[1] or "unknown"
        return (
            f"{path} needs glibc {glibc.group(1)} or newer and this system has {have}: install a "
            "wheel built for an older system (manylinux), or build from source with "
            "`python -m pip install --no-binary qwenclip qwenclip` (needs Rust)"
        )
    return f"{path} could not be loaded: {text}"


def _lib_names(cuda: bool) -> list[str]:
    stem = "qwenclip_cuda" if cuda else "qwenclip"
    if sys.platform == "win32":
        return [f"{stem}.dll"]
    if sys.platform == "darwin":
        return [f"lib{stem}.dylib"]
    return [f"lib{stem}.so"]


def packaged_library() -> Path | None:
    """The library the wheel installed beside this file."""
    found = sorted(PACKAGE_DIR.glob("_lib.*")) if PACKAGE_DIR.is_dir() else []
    found = [p for p in found if p.suffix in (".so", ".dylib", ".pyd", ".dll")]
    return found[0] if found else None


def checkout_places() -> list[Path]:
    if (CHECKOUT_DIR / "Cargo.toml").is_file():
        return [CHECKOUT_DIR / "target" / "release", CHECKOUT_DIR / "target" / "debug"]
    return []


def _cuda_wanted() -> bool:
    if os.environ.get("QWENCLIP_NO_CUDA"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: the CPU build is the safe choice
        return False


class _Memory(ctypes.Structure):
    _fields_ = [("cpu_bytes", ctypes.c_uint64), ("cuda_bytes", ctypes.c_uint64)]


_u64 = ctypes.c_uint64
_size = ctypes.c_size_t
_str = ctypes.c_char_p
_fptr = ctypes.c_void_p  # float buffers are passed as raw addresses (torch data_ptr)
_buf = ctypes.c_char_p  # JSON written into a caller buffer (see _json)
_sizep = ctypes.POINTER(_size)


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
            "qwenclip_last_warning": ([], _str),
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
            "qwenclip_train_defaults": ([_buf, _size, _sizep], ctypes.c_int),
            "qwenclip_encode_weighted": (
                [_u64, ctypes.POINTER(_str), _size, _str, _fptr, _size, _fptr, _size],
                ctypes.c_int,
            ),
            "qwenclip_prompt_weights": ([_str, _str, _buf, _size, _sizep], ctypes.c_int),
            "qwenclip_captions_read": ([_str, _buf, _size, _sizep], ctypes.c_int),
            "qwenclip_run_open": ([_u64, _str, ctypes.POINTER(_u64)], ctypes.c_int),
            "qwenclip_run_state": ([_u64, _buf, _size, _sizep], ctypes.c_int),
            "qwenclip_run_supply": ([_u64, _fptr, _size, _fptr, _size], ctypes.c_int),
            "qwenclip_run_noise": ([_u64, _size, _fptr, _size], ctypes.c_int),
            "qwenclip_run_conditioning": ([_u64, _fptr, _size, _fptr, _size], ctypes.c_int),
            "qwenclip_run_supply_gradient": (
                [_u64, _fptr, _size, _fptr, _size, _fptr, _size, _fptr, _size, ctypes.c_double],
                ctypes.c_int,
            ),
            "qwenclip_run_save": ([_u64], ctypes.c_int),
            "qwenclip_run_loss_image": ([_u64, _fptr, _size, _sizep, _sizep], ctypes.c_int),
            "qwenclip_run_free": ([_u64], ctypes.c_int),
        }
        for name, (args, res) in sig.items():
            f = getattr(lib, name)  # AttributeError: not a qwenclip library
            f.argtypes = args
            f.restype = res
        abi = lib.qwenclip_abi_version()
        if abi != ABI_VERSION:
            raise OSError(f"C interface version {abi}, this Python package needs {ABI_VERSION}")
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
        cfg = _json_arg(config, "encoder config")
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

    def encode_into(
        self, handle, prompts, embeds_ptr, embeds_len, pooled_ptr, pooled_len, syntax: str = "none"
    ) -> list[str]:
        """Encodes into caller buffers given as addresses + sizes in floats; returns the
        library's warnings (prompts cut at the token limit). `syntax`: "none" (plain text),
        "comfy" or "a1111" (prompt weighting, parsed by the library)."""
        arr, n = self._prompts(prompts)
        self._check(
            self._lib.qwenclip_encode_weighted(
                handle, arr, n, syntax.encode(), embeds_ptr, embeds_len, pooled_ptr, pooled_len
            ),
            "encode",
        )
        text = self._lib.qwenclip_last_warning()
        return [w for w in (text.decode("utf-8", "replace") if text else "").splitlines() if w]

    def prompt_weights(self, prompt: str, syntax: str) -> list[tuple[str, float]]:
        """The library's reading of a weighted prompt: (text, weight) segments whose texts,
        joined, are what the LLM reads."""
        spec = prompt.encode("utf-8")
        doc = self._json(
            "prompt weights",
            lambda b, n, need: self._lib.qwenclip_prompt_weights(syntax.encode(), spec, b, n, need),
        )
        return [(t, float(w)) for t, w in doc["segments"]]

    def _json(self, what: str, call) -> dict:
        """A JSON document from an export that fills a caller buffer: size, then data."""
        needed = _size()
        self._check(call(None, 0, ctypes.byref(needed)), what)
        buf = ctypes.create_string_buffer(needed.value)
        self._check(call(buf, needed.value, ctypes.byref(needed)), what)
        return json.loads(buf.value.decode("utf-8"))

    def train_defaults(self) -> dict:
        """Every training setting with its default (the library's TrainConfig)."""
        return self._json("training defaults", self._lib.qwenclip_train_defaults)

    def captions_read(self, paths: list[str], text: str | None = None) -> dict:
        """A caption set by the library's caption rule: captions and counts."""
        spec = _json_arg({"paths": [str(p) for p in paths], "text": text}, "captions")
        return self._json("captions", lambda b, n, need: self._lib.qwenclip_captions_read(spec, b, n, need))

    def run_open(self, encoder: int, spec: dict) -> int:
        h = _u64()
        self._check(
            self._lib.qwenclip_run_open(encoder, _json_arg(spec, "training run"), ctypes.byref(h)),
            "training run",
        )
        return h.value

    def run_state(self, handle: int) -> dict:
        return self._json(
            "training run state", lambda b, n, need: self._lib.qwenclip_run_state(handle, b, n, need)
        )

    def run_supply(self, handle, embeds_ptr, embeds_len, pooled_ptr, pooled_len) -> None:
        self._check(
            self._lib.qwenclip_run_supply(handle, embeds_ptr, embeds_len, pooled_ptr, pooled_len),
            "training step",
        )

    def run_noise(self, handle, channels, noise_ptr, noise_len) -> None:
        """The pending trajectory's starting noise (standard normal) into a float buffer."""
        self._check(self._lib.qwenclip_run_noise(handle, channels, noise_ptr, noise_len), "trajectory noise")

    def run_conditioning(self, handle, embeds_ptr, embeds_len, pooled_ptr, pooled_len) -> None:
        """The student's conditioning for the pending training batch of a host-judged run."""
        self._check(
            self._lib.qwenclip_run_conditioning(handle, embeds_ptr, embeds_len, pooled_ptr, pooled_len),
            "student conditioning",
        )

    def run_supply_gradient(self, handle, targets, grads, loss: float) -> None:
        """targets, grads: ((embeds_ptr, embeds_len), (pooled_ptr, pooled_len)) each."""
        (e, el), (p, pl) = targets
        (ge, gel), (gp, gpl) = grads
        self._check(
            self._lib.qwenclip_run_supply_gradient(handle, e, el, p, pl, ge, gel, gp, gpl, float(loss)),
            "training step",
        )

    def run_save(self, handle: int) -> None:
        self._check(self._lib.qwenclip_run_save(handle), "training save")

    def run_loss_image(self, handle: int):
        """The run's loss picture as a uint8 numpy array [H, W, 3]."""
        import numpy as np

        w, h = _size(), _size()
        self._check(
            self._lib.qwenclip_run_loss_image(handle, None, 0, ctypes.byref(w), ctypes.byref(h)),
            "loss picture",
        )
        rgb = np.empty((h.value, w.value, 3), np.uint8)
        self._check(
            self._lib.qwenclip_run_loss_image(
                handle, rgb.ctypes.data, rgb.nbytes, ctypes.byref(w), ctypes.byref(h)
            ),
            "loss picture",
        )
        return rgb

    def run_free(self, handle: int) -> None:
        self._check(self._lib.qwenclip_run_free(handle), "training run free")


_lock = threading.Lock()
_loaded: Library | None = None
_failure: str | None = None


def _try(path: Path, tried: list[str]) -> Library | None:
    if not path.is_file():
        return None
    try:
        return Library(path)
    except AttributeError as e:
        tried.append(f"{path} is not a qwenclip library ({e})")
    except OSError as e:
        tried.append(explain_load_failure(path, e))
    return None


def _search_folder(place: Path, want_cuda: bool, looked: list[str], tried: list[str]) -> Library | None:
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
    if not want_cuda:  # a CUDA build also runs on the CPU: take it when it is all there is
        for name in _lib_names(cuda=True):
            lib = _try(place / name, tried)
            if lib is not None:
                return lib
    return None


def find() -> Library:
    """Finds and loads the library (no caching; see `get`)."""
    tried: list[str] = []
    looked: list[str] = []
    env = os.environ.get("QWENCLIP_LIB")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise LibraryMissing(f"qwenclip: QWENCLIP_LIB={env} does not exist. " + install_hint())
        lib = _try(p, tried) if p.is_file() else _search_folder(p, _cuda_wanted(), looked, tried)
        if lib is not None:
            return lib
        raise LibraryMissing(
            f"qwenclip: QWENCLIP_LIB={env}: " + ("; ".join(tried) or "no library in it") + "."
        )
    packaged = packaged_library()
    if packaged is not None:
        looked.append(str(packaged))
        lib = _try(packaged, tried)
        if lib is not None:
            return lib
        # The installed build is the user's choice: say why it failed rather than run another.
        raise LibraryMissing("qwenclip: " + "; ".join(tried) + ".")
    want_cuda = _cuda_wanted()
    for place in checkout_places():
        lib = _search_folder(place, want_cuda, looked, tried)
        if lib is not None:
            return lib
    detail = f" Some failed to load: {'; '.join(tried)}." if tried else ""
    where = ", ".join(looked) if looked else str(PACKAGE_DIR)
    raise LibraryMissing(
        f"qwenclip: the qwenclip library was not found (looked in {where}).{detail} " + install_hint()
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
