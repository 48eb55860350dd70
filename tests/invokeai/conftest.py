"""Set-up for the InvokeAI node pack tests: tiny models and one real InvokeAI server.

Run through `.ci/invokeai.sh`, whose cached environment runs pytest (InvokeAI, torch and
diffusers are imported from it). Needs QWENCLIP_DEV_BIN (the qwenclip-dev command, which
writes the tiny Qwen3 and its adapter) and an importable qwenclip package (installed, or
PYTHONPATH=python with QWENCLIP_LIB naming the library).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

if not os.environ.get("QWENCLIP_DEV_BIN") or not Path(os.environ["QWENCLIP_DEV_BIN"]).is_file():
    raise pytest.UsageError("QWENCLIP_DEV_BIN must name the qwenclip-dev command: run `bash .ci/invokeai.sh`")
if not (Path(sys.executable).parent / "invokeai-web").is_file():
    raise pytest.UsageError("run these tests with the InvokeAI environment's Python: `bash .ci/invokeai.sh`")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> dict:
    """The library's seeded tiny Qwen3 and its adapter (SDXL-shaped outputs)."""
    out = tmp_path_factory.mktemp("qwenclip")
    subprocess.run(
        [os.environ["QWENCLIP_DEV_BIN"], "tiny", "--out", str(out)], check=True, capture_output=True
    )
    return {"model": str(out / "model"), "adapter": str(out / "adapter")}


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from tiny_sdxl import make

    return make(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real InvokeAI server with the node pack in its nodes/ folder, for the whole session."""
    from invokeai_server import InvokeAIServer

    s = InvokeAIServer(tmp_path_factory.mktemp("invokeai_root"))
    s.prepare()
    s.start()
    yield s
    s.stop()
