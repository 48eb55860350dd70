"""The installed wheel, in a fresh venv with no Rust toolchain (run by .ci/wheel.sh): the
package encodes from Python and through its `qwenclip` command, identically; importing it loads
nothing; a library that cannot load is one clear error, never a crash.

Environment (set by .ci/wheel.sh): QWENCLIP_DEV_BIN (writes the seeded tiny model),
QWENCLIP_PATCHELF (to make a library with a missing dependency), QWENCLIP_WHEEL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import qwenclip

PROMPTS = ["a red cube left of a blue sphere", "a cat under a wooden table", ""]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [os.environ["QWENCLIP_DEV_BIN"], "tiny", "--out", str(out)], check=True, capture_output=True
    )
    return {"model": out / "model", "adapter": out / "adapter"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """F32 tensors of a safetensors file (the format is 8 bytes of header length, a JSON
    header, then the data): no safetensors package in this venv."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(info["shape"])
    return out


def test_no_rust_toolchain_and_the_package_is_the_installed_wheel():
    assert shutil.which("cargo") is None and shutil.which("rustc") is None
    site = Path(sysconfig.get_paths()["purelib"])
    assert Path(qwenclip.__file__).is_relative_to(site)
    lib = qwenclip.library()
    assert lib.path.parent == site / "qwenclip" and lib.path.name.startswith("_lib.")
    assert not lib.has_cuda
    command = shutil.which("qwenclip")
    assert command is not None and Path(command).parent == Path(sys.executable).parent


def test_encode_from_python_equals_the_command_of_the_wheel(tiny, tmp_path):
    with qwenclip.Encoder(tiny["model"], adapter=tiny["adapter"]) as enc:
        embeds, pooled = enc.encode(PROMPTS, output="numpy")
    assert embeds.shape == (3, 77, 2048) and pooled.shape == (3, 1280)
    assert np.isfinite(embeds).all() and np.isfinite(pooled).all()
    assert embeds.std() > 0.01  # not constant
    assert np.abs(embeds[0] - embeds[1]).max() > 1e-3  # depends on the prompt

    out = tmp_path / "cond.safetensors"
    args = ["qwenclip", "encode", "--model", str(tiny["model"]), "--adapter", str(tiny["adapter"])]
    for p in PROMPTS:
        args += ["--prompt", p]
    r = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli = read_safetensors(out)
    # the same library code in both: the same bits
    assert np.array_equal(cli["prompt_embeds"], embeds)
    assert np.array_equal(cli["pooled_prompt_embeds"], pooled)


def test_importing_loads_nothing_and_imports_neither_torch_nor_numpy():
    code = (
        "import sys, qwenclip;"
        "print(qwenclip.loaded_library() is None, 'torch' in sys.modules, 'numpy' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["True", "False", "False"]


def test_bad_model_is_a_python_exception_with_the_library_message(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(qwenclip.QwenclipError) as e:
        qwenclip.Encoder(missing)
    assert str(missing) in str(e.value) and e.value.status != 0


def test_a_nan_setting_is_refused_by_name_before_the_library_sees_it(tiny, tmp_path):
    # JSON has no NaN: json.dumps would write `NaN`, which the library cannot read
    with qwenclip.Encoder(tiny["model"]) as enc, pytest.raises(ValueError) as e:
        qwenclip.TrainingRun(
            enc,
            {
                "out": str(tmp_path / "run"),
                "captions": {"paths": [], "text": "a cat"},
                "settings": {"lr_lora": float("nan")},
            },
        )
    assert "settings.lr_lora is nan" in str(e.value)
    assert not (tmp_path / "run").exists()


def _package_copy(tmp_path: Path) -> Path:
    """A copy of the installed package whose library is altered by the test."""
    dest = tmp_path / "site"
    shutil.copytree(Path(qwenclip.__file__).parent, dest / "qwenclip")
    return dest


def _load_in_child(site: Path) -> subprocess.CompletedProcess:
    code = (
        "import qwenclip\n"
        "try:\n"
        "    qwenclip.library()\n"
        "except qwenclip.LibraryMissing as e:\n"
        "    print('LibraryMissing:', e)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
    )


def test_a_cuda_build_without_the_cuda_runtime_says_what_is_missing_and_how_to_get_the_cpu_wheel(tmp_path):
    site = _package_copy(tmp_path)
    lib = next((site / "qwenclip").glob("_lib.*"))
    # What the CUDA wheel's library needs and a machine without CUDA 13 lacks.
    subprocess.run([os.environ["QWENCLIP_PATCHELF"], "--add-needed", "libcublas.so.13", str(lib)], check=True)
    r = _load_in_child(site)
    assert r.returncode == 0, r.stderr  # an exception, not a crash
    msg = r.stdout
    assert msg.startswith("LibraryMissing:"), msg
    assert "libcublas.so.13" in msg and "CUDA build" in msg
    assert "pip install --force-reinstall --no-deps 'qwenclip==0.1.0'" in msg, msg


def test_a_file_that_is_not_the_library_is_named_in_the_error(tmp_path):
    site = _package_copy(tmp_path)
    lib = next((site / "qwenclip").glob("_lib.*"))
    lib.write_bytes(b"\x7fELF truncated")
    r = _load_in_child(site)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("LibraryMissing:") and str(lib) in r.stdout, r.stdout


def test_a_glibc_too_old_is_explained():
    from qwenclip._native import explain_load_failure

    err = OSError(
        "/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.34' not found (required by _lib.abi3.so)"
    )
    msg = explain_load_failure(Path("_lib.abi3.so"), err)
    assert "glibc 2.34 or newer" in msg and "--no-binary qwenclip" in msg
