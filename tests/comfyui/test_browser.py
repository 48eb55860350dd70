"""Every UI-format workflow in workflows/ in the real ComfyUI frontend (headless Debian
Chromium + playwright-core): no missing node types, every widget value loads as saved, the
frontend's prompt equals the API-format twin, and the server accepts it (HTTP 200)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE.parents[1] / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json"))


def _strip(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.fixture(scope="module")
def browser_results(server, tmp_path_factory):
    modules = os.environ.get("QWENCLIP_NODE_MODULES")
    if not modules or not Path(modules, "playwright-core").is_dir():
        pytest.fail("QWENCLIP_NODE_MODULES must hold playwright-core: run with `bash .ci/comfyui.sh`")
    work = tmp_path_factory.mktemp("browser")
    shutil.copy(HERE / "browser.mjs", work / "browser.mjs")
    os.symlink(modules, work / "node_modules")  # ESM resolves packages next to the script
    shots = work / "screenshots"
    shots.mkdir()
    r = subprocess.run(
        ["node", str(work / "browser.mjs"), server.url, str(shots), *map(str, UI_FILES)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    results = {x["file"]: x for x in json.loads(r.stdout.strip().splitlines()[-1])}
    # the accepted prompts were deleted / interrupted: wait until the queue is idle again
    t0 = time.time()
    while time.time() - t0 < 120:
        q = server.get("/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            break
        time.sleep(0.5)
    return results


def test_there_are_the_six_workflows_each_with_a_note():
    names = {p.stem for p in UI_FILES}
    assert names == {
        "sdxl_qwen_text_to_image",
        "sdxl_qwen_train_then_generate",
        "sdxl_clip_vs_qwen",
        "sdxl_qwen_tiny_demo",
        "sdxl_qwen_train_vision",
        "sdxl_qwen_lora_trigger",
    }
    for p in UI_FILES:
        ui = json.loads(p.read_text())
        notes = [n for n in ui["nodes"] if n["type"] == "Note"]
        assert notes and "What to set" in notes[0]["widgets_values"][0], p.name
        assert (WORKFLOWS / f"{p.stem}.api.json").is_file()


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_loads_in_the_frontend_and_the_server_accepts_it(browser_results, path):
    r = browser_results[path.name]
    assert r["missing"] == [], f"node types unknown to the frontend: {r['missing']}"
    assert r["load_error"] is None, r["load_error"]
    assert r["widget_errors"] == [], "\n".join(r["widget_errors"])
    assert r["offscreen"] == [], f"the saved view hides nodes (visible {r['view']}): {r['offscreen']}"
    assert r["page_errors"] == [], r["page_errors"]
    assert r["status"] == 200, json.dumps(r["body"], indent=1)[:4000]
    assert r["body"]["node_errors"] == {}
    twin = json.loads((WORKFLOWS / f"{path.stem}.api.json").read_text())
    assert _strip(r["prompt"]) == _strip(twin), "the API twin is what the frontend makes of the UI file"


def _toasts(server, tmp_path, text: str, shot: str) -> tuple[str, dict]:
    """Runs the text-to-image workflow (tiny models) with `text` as the positive prompt, queued
    from the real frontend; the warning toasts it showed."""
    from test_e2e import tiny, with_prompt, workflow

    prompt = with_prompt(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_toast"), text)
    (tmp_path / "prompt.json").write_text(json.dumps(prompt))
    shutil.copy(HERE / "toast.mjs", tmp_path / "toast.mjs")
    os.symlink(os.environ["QWENCLIP_NODE_MODULES"], tmp_path / "node_modules")
    path = HERE.parents[1] / "target" / "test-scratch" / shot
    path.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["node", str(tmp_path / "toast.mjs"), server.url, str(tmp_path / "prompt.json"), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["page_errors"] == [], out["page_errors"]
    return "\n".join(out["toasts"]), out


def test_a_prompt_cut_at_the_token_limit_shows_a_warning_in_the_frontend(server, tmp_path):
    long_prompt = " ".join(["a red cube left of a blue sphere under a lamp"] * 60)  # > 256 tokens
    toasts, out = _toasts(server, tmp_path, long_prompt, "warning-toast.png")
    assert (
        "Qwen Text Encode (SDXL)" in toasts and "the last" in toasts and "were dropped (limit 256)" in toasts
    ), out
    assert "were dropped (limit 256)" in server.log(), "the server log has it too"


def test_an_embedding_name_shows_a_warning_in_the_frontend(server, tmp_path):
    toasts, out = _toasts(server, tmp_path, "a red cube, embedding:EasyNegative", "embedding-toast.png")
    assert "Qwen Text Encode (SDXL)" in toasts and "embedding:EasyNegative" in toasts, out
    assert "connect the checkpoint's CLIP" in toasts, out
