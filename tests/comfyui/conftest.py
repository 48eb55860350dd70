"""Shared set-up: ComfyUI's own modules on the CPU, the node pack imported as ComfyUI imports
it (a package), tiny models. Run through `.ci/comfyui.sh`, which provides:

  QWENCLIP_COMFYUI   the ComfyUI 0.3.75 tree (its venv runs pytest)
  QWENCLIP_BIN       the qwenclip command (the wheel's)
  QWENCLIP_DEV_BIN   the qwenclip-dev command (writes the tiny models)

and the library under test as users get it: the qwenclip wheel, installed into the venv from
the pack's requirements.txt (QWENCLIP_LIB unset).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PLUGIN = ROOT / "plugin"
PACKAGE = "comfyui_qwenclip"

COMFY = os.environ.get("QWENCLIP_COMFYUI")
if not COMFY or not Path(COMFY, "main.py").is_file():
    raise pytest.UsageError(
        "QWENCLIP_COMFYUI must name a ComfyUI tree: run these tests with `bash .ci/comfyui.sh`"
    )
for var in ("QWENCLIP_BIN", "QWENCLIP_DEV_BIN"):
    if not os.environ.get(var) or not Path(os.environ[var]).is_file():
        raise pytest.UsageError(f"{var} must name a built file: run these tests with `bash .ci/comfyui.sh`")

sys.path.insert(0, COMFY)
sys.path.insert(0, str(HERE))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwenclip")


@pytest.fixture(scope="session")
def tiny(session_tmp) -> dict:
    """The library's seeded tiny Qwen3 (hidden 32) and its adapter bundle."""
    out = session_tmp / "tiny"
    subprocess.run(
        [os.environ["QWENCLIP_DEV_BIN"], "tiny", "--out", str(out)], check=True, capture_output=True, cwd=ROOT
    )
    return {"model": out / "model", "adapter": out / "adapter"}


@pytest.fixture(scope="session")
def comfy_dirs(session_tmp, tiny) -> dict:
    """ComfyUI folders for the tests: text_encoders/qwen3-tiny, qwenclip/tiny, input/."""
    import folder_paths

    te = session_tmp / "models" / "text_encoders"
    qc = session_tmp / "models" / "qwenclip"
    inp = session_tmp / "input"
    for d in (te, qc, inp):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny["model"], te / "qwen3-tiny", dirs_exist_ok=True)
    shutil.copytree(tiny["adapter"], qc / "tiny", dirs_exist_ok=True)
    folder_paths.add_model_folder_path("text_encoders", str(te), is_default=True)
    folder_paths.set_input_directory(str(inp))
    pack = plugin_package()
    pack.nodes.register_models_folder()
    folder_paths.add_model_folder_path("qwenclip", str(qc), is_default=True)
    return {"text_encoders": te, "qwenclip": qc, "input": inp}


def plugin_package():
    """The node pack imported the way ComfyUI does: as a package from its folder."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        PACKAGE, PLUGIN / "__init__.py", submodule_search_locations=[str(PLUGIN)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def pack(comfy_dirs):
    return plugin_package()


@pytest.fixture(scope="session")
def teacher_clip():
    return plugin_package().demo.tiny_clip()


@pytest.fixture(scope="session")
def encoder(pack):
    """Qwen Encoder Loader on the tiny model + adapter (f32, CPU)."""
    return pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "tiny", "cpu", "f32")[0]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real ComfyUI 0.3.75 server on 127.0.0.1 with the pack, for the whole session."""
    from comfy_server import ComfyServer
    from make_workflows import PLACEHOLDERS

    base = tmp_path_factory.mktemp("comfyui")
    hf_home = base / "hf_home"
    hf_home.mkdir()
    s = ComfyServer(base, extra_env={"HF_HOME": str(hf_home)})
    s.prepare(PLACEHOLDERS)
    s.start()
    yield s
    s.stop()


class Progress:
    """Stands in for ComfyUI's server hook: records calls and, like it, raises when the user
    pressed Cancel (`interrupt_current_processing`)."""

    def __init__(self, cancel_at=None):
        self.calls = []
        self.cancel_at = cancel_at

    def __call__(self, value, total, preview, node_id=None, prompt_id=None):
        import comfy.model_management as mm

        self.calls.append((value, total, preview is not None))
        if self.cancel_at is not None and value >= self.cancel_at:
            mm.interrupt_current_processing(True)  # the Cancel button
        mm.throw_exception_if_processing_interrupted()


@pytest.fixture
def progress_hook():
    import comfy.utils

    def install(hook):
        comfy.utils.set_progress_bar_global_hook(hook)
        return hook

    yield install
    comfy.utils.set_progress_bar_global_hook(None)
    import comfy.model_management as mm

    mm.interrupt_current_processing(False)
