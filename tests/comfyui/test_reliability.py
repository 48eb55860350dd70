"""Reliability in a real ComfyUI 0.3.75 server: bad inputs fail their node with a message that
says what is wrong and where, and the server goes on; a server killed in the middle of a
training run resumes it, on restart, exactly where its last checkpoint left it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch
from comfy_server import ComfyServer
from test_e2e import pixels, run_state, saved_images, tiny, with_prompt, workflow

# A file of the library's atomic writes while it is being written (src/formats/atomic.rs:
# `.{name}.tmp{pid}`); a kill in the middle of a save leaves it behind.
ATOMIC_TEMP = re.compile(r"^\..+\.tmp\d+$")


def _error(entry: dict) -> dict:
    """The execution_error of a finished prompt that failed."""
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


def _fails(server, graph: dict, node_type: str, *says: str) -> str:
    """Queues `graph`: it fails in `node_type` with a message holding every one of `says`, in
    seconds, and the server is still up. Returns the message."""
    entry = server.wait(server.queue(graph), timeout=60)
    error = _error(entry)
    message = error["exception_message"]
    assert error["node_type"] == node_type, error
    for part in says:
        assert part in message, f"{part!r} not in {node_type}'s message: {message}"
    assert "Traceback" not in message and len(message) < 600, message
    assert server.proc.poll() is None, f"the server died:\n{server.log()[-3000:]}"
    return message


def _refused(server, graph: dict, node_id: str, field: str, *says: str) -> None:
    """/prompt refuses `graph` (HTTP 400) naming node `node_id`'s input `field`."""
    status, body = server.post("/prompt", {"prompt": graph, "client_id": server.client_id})
    assert status == 400, f"accepted ({status}): {body}"
    errors = body["node_errors"][node_id]["errors"]
    text = json.dumps(errors)
    assert any(e["extra_info"].get("input_name") == field for e in errors), text[:2000]
    for part in says:
        assert part in text, f"{part!r} not in {text[:2000]}"


def _node(graph: dict, class_type: str) -> str:
    """The id of the graph's first node of `class_type` (the positive prompt's, for the text
    encode nodes)."""
    return next(k for k, n in graph.items() if n["class_type"] == class_type)


def _inputs(graph: dict, class_type: str) -> dict:
    return graph[_node(graph, class_type)]["inputs"]


def _t2i(prefix: str, text: str = "a small red boat on a calm lake at dawn") -> dict:
    return with_prompt(tiny(workflow("sdxl_qwen_text_to_image"), prefix=prefix), text)


def _train_only(name: str, **train) -> dict:
    """The training half of workflows/sdxl_qwen_train_then_generate on tiny models (MSE):
    Tiny SDXL's CLIP teaches, the loss curve goes to Preview Image."""
    graph = tiny(workflow("sdxl_qwen_train_then_generate"), prefix="rel_train", adapter_name=name, **train)
    keep = {"QwenDemoTinySDXL", "QwenEncoderLoader", "QwenAdapterTrain", "PreviewImage"}
    return {k: n for k, n in graph.items() if n["class_type"] in keep}


def test_bad_inputs_fail_their_node_clearly_and_the_server_goes_on(server):
    base = server.base
    log_start = len(server.log())  # the shared server's log holds other tests' lines before
    models, qwenclip_dir = base / "models" / "text_encoders", base / "models" / "qwenclip"

    # (a) A missing base model. A name that is not in the list: refused when queued, naming
    # the input and what is there.
    graph = _t2i("rel_missing")
    _inputs(graph, "QwenEncoderLoader")["base_model"] = "qwen3-nowhere"
    _refused(
        server,
        graph,
        _node(graph, "QwenEncoderLoader"),
        "base_model",
        "qwen3-nowhere",
        "not in",
        "qwen3-tiny",
    )
    # A folder that exists but is empty (hub_id takes a path): the file it lacks.
    empty = base / "rel_empty_model"
    empty.mkdir(exist_ok=True)
    graph = _t2i("rel_empty")
    _inputs(graph, "QwenEncoderLoader")["hub_id"] = str(empty)
    _fails(server, graph, "QwenEncoderLoader", str(empty / "tokenizer.json"), "not found")
    # A listed model folder whose weights are gone.
    broken = models / "rel-qwen3-no-weights"
    shutil.copytree(models / "qwen3-tiny", broken, dirs_exist_ok=True)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    graph = _t2i("rel_noweights")
    _inputs(graph, "QwenEncoderLoader")["base_model"] = broken.name
    _fails(server, graph, "QwenEncoderLoader", str(broken), "no model.safetensors")

    # (b) A corrupt adapter: the tiny adapter with one of its .safetensors cut to half.
    for adapter, cut in (
        ("rel_cut_resampler", "resampler.safetensors"),
        ("rel_cut_lora", "adapter_model.safetensors"),
    ):
        shutil.copytree(qwenclip_dir / "tiny", qwenclip_dir / adapter, dirs_exist_ok=True)
        f = qwenclip_dir / adapter / cut
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        graph = tiny(workflow("sdxl_qwen_text_to_image"), adapter=adapter, prefix=f"rel_{adapter}")
        _fails(server, graph, "QwenEncoderLoader", str(f), "not a valid safetensors file")

    # (c) A CLIP that is not SDXL's: SD1.5's CLIP-L, from ComfyUI's own CLIPLoader (a stub file
    # it detects as CLIP-L by its keys; the weights it lacks do not matter, only its width),
    # on the text encode node's clip input and as the training node's teacher.
    from safetensors.torch import save_file

    save_file(
        {"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(3072, 768, dtype=torch.float16)},
        str(models / "rel_sd15_clip_l.safetensors"),
    )
    sd15 = {
        "class_type": "CLIPLoader",
        "inputs": {"clip_name": "rel_sd15_clip_l.safetensors", "type": "stable_diffusion"},
    }
    graph = _t2i("rel_sd15")
    graph["900"] = sd15
    _inputs(graph, "QwenTextEncodeSDXL").update(clip=["900", 0], clip_text="a trigger word")
    _fails(server, graph, "QwenTextEncodeSDXL", "768-wide tokens", "SDXL's makes 2048", "connect the SDXL")
    graph = _train_only("rel_after_bad_inputs", steps=2, save_every=2)
    graph["900"] = sd15
    _inputs(graph, "QwenAdapterTrain")["clip"] = ["900", 0]
    _fails(server, graph, "QwenAdapterTrain", "(1, 77, 768)", "[1, 77, 2048]", "CLIP of an SDXL checkpoint")

    # (d) A 20,000-word prompt: it runs, cut at the token limit, and the user is told (the
    # console here; the same warning is a toast in the frontend, test_browser.py).
    words = " ".join(f"word{i % 997}" for i in range(20_000))
    log_before = len(server.log())
    entry = server.wait(server.queue(_t2i("rel_long", words)), timeout=60)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    (picture,) = saved_images(server, entry)
    pixels(picture)
    # this prompt's warning, not an earlier test's
    said = r"Qwen Text Encode \(SDXL\) \(node \d+\): the prompt has (\d+) tokens; the last (\d+) were dropped \(limit 256\)"
    cut = re.search(said, server.log()[log_before:])
    assert cut, server.log()[-2000:]
    tokens, dropped = int(cut.group(1)), int(cut.group(2))
    assert tokens >= 20_000 and tokens - dropped == 256, cut.group(0)

    # (e) Width 0 on the encode node: SDXL size conditioning, which CLIPTextEncodeSDXL also takes
    # from 0 (its widgets' minimum, and ours), so it renders; below 0 is refused when queued.
    graph = _t2i("rel_width0")
    _inputs(graph, "QwenTextEncodeSDXL")["width"] = 0
    (picture,) = saved_images(server, server.run(graph, timeout=60))
    pixels(picture)
    graph = _t2i("rel_width_negative")
    _inputs(graph, "QwenTextEncodeSDXL")["width"] = -1
    _refused(server, graph, _node(graph, "QwenTextEncodeSDXL"), "width", "smaller than min of 0")

    # (f) A NaN learning rate. ComfyUI's min/max check passes NaN, which an API client sends as
    # the JSON extension NaN (Python's json) or the string "nan"; the frontend's JSON has no
    # NaN (it writes null), which ComfyUI refuses when queued, naming the input.
    for nan in (float("nan"), "nan"):
        graph = _train_only("rel_after_bad_inputs", steps=2, save_every=2)
        _inputs(graph, "QwenAdapterTrain")["lr_lora"] = nan
        _fails(server, graph, "QwenAdapterTrain", "lr_lora is nan", "finite number")
    _inputs(graph, "QwenAdapterTrain")["lr_lora"] = None
    _refused(
        server,
        graph,
        _node(graph, "QwenAdapterTrain"),
        "lr_lora",
        "Failed to convert an input value to a FLOAT value",
    )
    run = qwenclip_dir / "rel_after_bad_inputs"
    assert not (run / "checkpoint.safetensors").exists() and not (run / "adapter").exists()

    assert server.proc.poll() is None

    # (g) Then a good graph, training into the folder the failed runs named and rendering with
    # the adapter: it runs, and the picture is a real one.
    good = tiny(
        workflow("sdxl_qwen_train_then_generate"),
        prefix="rel_good",
        adapter_name="rel_after_bad_inputs",
        steps=2,
        save_every=2,
    )
    entry = server.run(good, timeout=120)
    assert run_state(run)["step"] == 2
    (picture,) = saved_images(server, entry)
    assert pixels(picture).shape == (64, 64, 3)
    assert "invalid value encountered" not in server.log()[log_start:], "NaN reached a picture"


def _checkpoint_step(run: Path) -> int | None:
    """The step of the run's checkpoint, None while there is none (it is replaced atomically:
    a reader sees a whole file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
            return json.loads(f.metadata()["qwenclip.trainer"])["t"]
    except FileNotFoundError:
        return None


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _metric_lines(run: Path, upto: int) -> list[str]:
    """metrics.jsonl's lines up to step `upto` (and the lines without a step), as written."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a line the kill cut short
        if step <= upto:
            out.append(line)
    return out


def test_a_server_killed_in_the_middle_of_training_resumes_the_run_on_restart(tmp_path):
    steps = 24
    graph = _train_only("rel_killed", steps=steps, save_every=2)
    first = ComfyServer(tmp_path)
    first.prepare()
    run = tmp_path / "models" / "qwenclip" / "rel_killed"
    first.start()
    try:
        first.queue(graph)
        t0 = time.time()
        while (_checkpoint_step(run) or 0) < 4:
            assert time.time() - t0 < 120 and first.proc.poll() is None, first.log()[-3000:]
            time.sleep(0.05)
        os.killpg(first.proc.pid, signal.SIGKILL)  # the whole process group, no clean-up
        first.proc.wait(30)
    finally:
        first.stop()
    killed = first.proc.pid
    stopped = _checkpoint_step(run)
    assert stopped is not None and 4 <= stopped < steps, f"killed at step {stopped} of {steps}"
    assert "qwenclip: trained" not in first.log(), "the run ended before the kill"
    before = _metric_lines(run, stopped)
    # A kill in the middle of a save leaves the file being written as `.NAME.tmpPID`. Where this
    # one landed is timing, so add such a file for certain.
    left = [p.name for p in run.rglob("*") if ATOMIC_TEMP.match(p.name)]
    ckpt = (run / "checkpoint.safetensors").read_bytes()
    (run / f".checkpoint.safetensors.tmp{killed}").write_bytes(ckpt[: len(ckpt) // 2])

    second = ComfyServer(tmp_path)
    second.log_path = tmp_path / "server-after-kill.log"
    second.start()
    try:
        second.run(graph, timeout=120)
        assert f"qwenclip: resuming {run} from step {stopped}" in second.log(), second.log()[-3000:]
        state = run_state(run)
        assert state["step"] == steps
        assert [s for s, _ in state["losses"]] == list(range(1, steps + 1))
        assert _metric_lines(run, stopped) == before, "the metrics up to the checkpoint were written again"
        temps = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.name.startswith(".")]
        assert not temps, f"temporary files left in the run folder: {temps} (the kill left {left})"
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)  # no line the kill cut short is kept

        # The same graph, uninterrupted, in another run folder: the same adapter, bit for bit.
        straight = tmp_path / "models" / "qwenclip" / "rel_straight"
        second.run(_train_only("rel_straight", steps=steps, save_every=2), timeout=120)
    finally:
        second.stop()
    assert second.log().count("qwenclip: trained") == 2
    resumed, uninterrupted = _files(run / "adapter"), _files(straight / "adapter")
    assert sorted(resumed) == sorted(uninterrupted) and "resampler.safetensors" in resumed
    for name in resumed:
        assert resumed[name] == uninterrupted[name], f"adapter/{name} differs from the uninterrupted run's"
