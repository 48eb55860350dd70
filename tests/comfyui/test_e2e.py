"""End to end in a real ComfyUI 0.3.75 server: the pack imports cleanly and fast, every node is
listed, and the shipped workflows run through /prompt on tiny models (the checkpoint loader
swapped for the test node that builds a tiny SDXL: real KSampler, real CLIP, real VAE):
text-to-image, CLIP vs Qwen, training then generating, Cancel then resume, and /free."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import qwenclip
import torch

ROOT = Path(__file__).resolve().parents[2]
OURS = {
    "QwenEncoderLoader": "Qwen Encoder Loader",
    "QwenTextEncodeSDXL": "Qwen Text Encode (SDXL)",
    "QwenAdapterTrain": "Qwen Adapter Train",
    "QwenAdapterSelect": "Qwen Adapter Select",
    "QwenDemoTinySDXL": "Tiny SDXL (offline demo)",
}
SMALL_TRAIN = {
    "batch_size": 2,
    "grad_accum": 1,
    "init": "scratch",
    "lora_r": 4,
    "lora_alpha": 4.0,
    "resampler_width": 64,
    "resampler_heads": 4,
    "resampler_layers": 1,
    "resampler_ff_mult": 2,
    "lr_lora": 1e-3,
    "lr_resampler": 1e-3,
}


def workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.api.json").read_text())


def tiny(prompt: dict, adapter: str = "tiny", prefix: str = "e2e", base: str = "qwen3-tiny", **train) -> dict:
    """The shipped workflow on tiny models: same graph, small sizes."""
    for node in prompt.values():
        t, i = node["class_type"], node["inputs"]
        if t == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "QwenDemoTinySDXL", {"seed": 0}
        elif t == "QwenEncoderLoader":
            i.update(base_model=base, device="cpu", dtype="f32")
            if i["adapter"] != "none":
                i["adapter"] = adapter
        elif t == "EmptyLatentImage":
            i.update(width=64, height=64)
        elif t == "KSampler":
            i.update(steps=2)
        elif t in ("QwenTextEncodeSDXL", "CLIPTextEncodeSDXL"):
            i.update(width=64, height=64, target_width=64, target_height=64)
        elif t == "QwenAdapterTrain":
            i.update(SMALL_TRAIN)
            i.update(train)
        elif t == "SaveImage":
            i["filename_prefix"] = f"{prefix}/{i['filename_prefix'].split('/')[-1]}"
    return prompt


def run_state(folder: Path) -> dict:
    """A run folder's step (its checkpoint's) and loss per step (its metrics)."""
    from safetensors import safe_open

    with safe_open(str(folder / "checkpoint.safetensors"), "pt") as f:
        step = json.loads(f.metadata()["qwenclip.trainer"])["t"]
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"step": step, "losses": [(x["step"], x["loss"]) for x in lines if "loss" in x]}


def pixels(path: Path):
    """A saved picture as float RGB, after checking it is one: not constant, many values."""
    import numpy as np
    from PIL import Image

    p = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert p.std() > 2.0 and len(np.unique(p)) > 32, f"{path.name} is flat: std {p.std():.2f}"
    return p


def with_prompt(prompt: dict, text: str) -> dict:
    """The graph with another positive prompt (the first text encode node's text)."""
    for node in prompt.values():
        if node["class_type"] in ("QwenTextEncodeSDXL", "CLIPTextEncodeSDXL"):
            node["inputs"]["text" if "text" in node["inputs"] else "text_g"] = text
            return prompt
    raise AssertionError("no text encode node")


def saved_images(server, entry: dict) -> list[Path]:
    out = []
    for node_out in entry["outputs"].values():
        for img in node_out.get("images", []):
            if img["type"] == "output":
                out.append(server.base / "output" / img["subfolder"] / img["filename"])
    return out


def test_object_info_lists_every_node(server):
    info = server.get("/object_info")
    for name, display in OURS.items():
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["display_name"] == display
        assert info[name]["category"].startswith("qwenclip")
        assert "comfyui-qwenclip" in info[name]["python_module"]
    assert info["QwenEncoderLoader"]["output"] == ["QWEN_ENCODER"]
    assert info["QwenTextEncodeSDXL"]["output"] == ["CONDITIONING"]
    assert info["QwenAdapterTrain"]["output"] == ["QWEN_ENCODER", "IMAGE"]
    assert info["QwenAdapterTrain"]["output_node"] is True
    loader = info["QwenEncoderLoader"]["input"]["required"]
    assert "qwen3-tiny" in loader["base_model"][0] and "tiny" in loader["adapter"][0]
    assert "qwen3-tiny-q8_0.gguf" in loader["base_model"][0], "a .gguf in text_encoders is a base model"


def test_server_log_has_no_import_error_and_the_pack_imports_fast(server):
    log = server.log()
    bad = [line for line in log.splitlines() if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not bad, "\n".join(bad)
    m = re.search(r"^\s*([\d.]+) seconds: .*comfyui-qwenclip\s*$", log, re.M)
    assert m, "the pack is in ComfyUI's import-time summary"
    assert float(m.group(1)) < 0.5
    # The library loads on first use (the node list reads the training defaults from it), not
    # while ComfyUI starts.
    started = log.find("To see the GUI go to")
    assert started >= 0 and log.find("qwenclip: using") in (-1, *range(started, len(log))), (
        "the library loads on first use, not at start-up"
    )


def test_node_help_pages_are_served_for_the_frontend(server):
    for name in OURS:
        status, body = server.request("GET", f"/extensions/comfyui-qwenclip/docs/{name}.md")
        assert status == 200, name


def test_status_route_reports_the_library(server):
    s = server.get("/qwenclip/status")
    assert s["error"] is None and Path(s["library"]) == qwenclip.library().path  # the wheel's
    assert s["cuda"] is False or s["cuda"] is True


def test_text_to_image_workflow(server):
    import numpy as np

    entry = server.run(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_t2i"))
    images = saved_images(server, entry)
    assert len(images) == 1 and images[0].is_file()
    picture = pixels(images[0])
    assert picture.shape == (64, 64, 3)
    # Same seed and prompt, with ComfyUI's caches dropped so everything runs again: the same
    # picture. Another prompt: another picture.
    assert server.post("/free", {"free_memory": True})[0] == 200
    again = pixels(
        saved_images(server, server.run(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_t2i_again")))[0]
    )
    assert np.array_equal(picture, again), "the same seed and prompt gave another picture"
    other_graph = with_prompt(
        tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_t2i_other"), "a lighthouse under the stars"
    )
    other = pixels(saved_images(server, server.run(other_graph))[0])
    assert np.abs(picture - other).mean() > 1.0, "another prompt gave the same picture"
    log = server.log()
    assert "RuntimeWarning" not in log and "invalid value encountered" not in log, log[-3000:]


def test_the_offline_demo_workflow_runs_as_shipped(server):
    """workflows/sdxl_qwen_tiny_demo as it is: what a new user runs by following the docs."""
    entry = server.run(workflow("sdxl_qwen_tiny_demo"))
    images = saved_images(server, entry)
    assert len(images) == 1 and pixels(images[0]).shape == (64, 64, 3)


def test_text_to_image_workflow_on_a_gguf_base(server):
    entry = server.run(
        tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_gguf", base="qwen3-tiny-q8_0.gguf")
    )
    images = saved_images(server, entry)
    assert len(images) == 1
    pixels(images[0])
    assert "qwen3-tiny-q8_0.gguf (cpu, f32)" in server.log()


def test_clip_vs_qwen_workflow(server):
    entry = server.run(tiny(workflow("sdxl_clip_vs_qwen"), prefix="e2e_cmp"))
    images = saved_images(server, entry)
    assert sorted(p.name.split("_0")[0] for p in images) == ["compare_clip", "compare_qwen"]
    clip, qwen = (pixels(p) for p in sorted(images))
    assert abs(clip - qwen).mean() > 1.0, "CLIP and Qwen conditioning gave the same picture"


def test_train_then_generate_then_load_the_saved_adapter(server):
    prompt = tiny(
        workflow("sdxl_qwen_train_then_generate"),
        prefix="e2e_train",
        adapter_name="e2e_adapter",
        steps=4,
        save_every=2,
    )
    entry = server.run(prompt)
    folder = server.base / "models" / "qwenclip" / "e2e_adapter"
    for f in (
        "adapter/qwenclip.json",
        "adapter/resampler.safetensors",
        "adapter/adapter_model.safetensors",
        "checkpoint.safetensors",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (folder / f).is_file(), f
    state = run_state(folder)
    assert state["step"] == 4 and len(state["losses"]) == 4
    images = saved_images(server, entry)
    assert len(images) == 1
    pixels(images[0])
    previews = [
        img for o in entry["outputs"].values() for img in o.get("images", []) if img["type"] == "temp"
    ]
    assert previews, "the loss curve reached the Preview Image node"
    assert "qwenclip: trained" in server.log()

    # The new adapter is listed, and the text-to-image workflow runs with it.
    info = server.get("/object_info/QwenEncoderLoader")
    assert "e2e_adapter" in info["QwenEncoderLoader"]["input"]["required"]["adapter"][0]
    entry = server.run(tiny(workflow("sdxl_qwen_text_to_image"), adapter="e2e_adapter", prefix="e2e_trained"))
    images = saved_images(server, entry)
    assert len(images) == 1
    pixels(images[0])
    assert f"adapter {folder / 'adapter'}" in server.log()


def test_cancel_saves_then_queueing_again_resumes(server):
    prompt = tiny(
        workflow("sdxl_qwen_train_then_generate"),
        prefix="e2e_cancel",
        adapter_name="e2e_cancel",
        steps=100000,
        save_every=100000,
    )
    pid = server.queue(prompt)
    t0 = time.time()
    while "qwenclip: step 1/100000" not in server.log():
        assert time.time() - t0 < 120, server.log()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    status, _ = server.post("/interrupt", {})
    assert status == 200
    entry = server.wait(pid, timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    folder = server.base / "models" / "qwenclip" / "e2e_cancel"
    state = run_state(folder)
    stopped = state["step"]
    assert (
        stopped >= 1
        and (folder / "checkpoint.safetensors").is_file()
        and (folder / "adapter" / "qwenclip.json").is_file()
    )
    assert "saved" in server.log() and "stopped: InterruptProcessingException" in server.log()

    prompt = tiny(
        workflow("sdxl_qwen_train_then_generate"),
        prefix="e2e_resume",
        adapter_name="e2e_cancel",
        steps=stopped + 3,
        save_every=100000,
    )
    server.run(prompt)
    state = run_state(folder)
    assert state["step"] == stopped + 3
    assert [s for s, _ in state["losses"]] == list(range(1, stopped + 4))
    assert f"resuming {folder} from step {stopped}" in server.log()


def _tiny_lora(path: Path, clip: bool = False) -> int:
    """A LoRA for the tiny SDXL's UNet (every attention projection, rank 2; with `clip`, also
    CLIP-L's and CLIP-G's q and v projections), in the kohya key format ComfyUI's LoraLoader
    reads; returns how many layers it patches."""
    import comfy.lora
    import conftest
    from safetensors.torch import save_file

    demo = conftest.plugin_package().demo
    model = demo.tiny_model(0)
    keys = {
        k: v
        for k, v in comfy.lora.model_lora_keys_unet(model.model, {}).items()
        if k.startswith("lora_unet_")
    }
    weights = {f"diffusion_model.{k}": v for k, v in model.model.diffusion_model.named_parameters()}
    if clip:
        te = demo.tiny_clip().cond_stage_model
        keys.update(
            (k, v)
            for k, v in comfy.lora.model_lora_keys_clip(te, {}).items()
            if k.startswith(("lora_te1_", "lora_te2_"))
        )
        weights.update(te.state_dict())
    g = torch.Generator().manual_seed(4)
    sd = {}
    for key, target in keys.items():
        if not isinstance(target, str) or not target.endswith(
            ("to_q.weight", "to_v.weight", "q_proj.weight", "v_proj.weight")
        ):
            continue
        out_f, in_f = weights[target].shape
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.1
        sd[f"{key}.lora_down.weight"] = torch.randn(2, in_f, generator=g) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return len(sd) // 3


def test_vision_workflow_trains_with_a_lora_on_the_model_then_renders_three_ways(server):
    layers = _tiny_lora(server.base / "models" / "loras" / "qwenclip_tiny_lora.safetensors")
    assert layers >= 4
    prompt = tiny(
        workflow("sdxl_qwen_train_vision"),
        prefix="e2e_vision",
        adapter_name="e2e_vision",
        steps=9,
        save_every=100,
        resolution=64,
        denoise_steps=3,
        lr_lora=3e-3,
        lr_resampler=3e-3,
    )
    train = next(k for k, n in prompt.items() if n["class_type"] == "QwenAdapterTrain")
    prompt["900"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {
            "model": prompt[train]["inputs"]["model"],
            "lora_name": "qwenclip_tiny_lora.safetensors",
            "strength_model": 1.0,
        },
    }
    prompt[train]["inputs"]["model"] = ["900", 0]
    entry = server.run(prompt)
    assert "lora key not loaded" not in server.log()
    state = run_state(server.base / "models" / "qwenclip" / "e2e_vision")
    losses = [x for _, x in state["losses"]]
    assert state["step"] == 9 and all(x == x and x > 0 for x in losses)
    # Three trajectories of three denoising steps: the loss falls from the first to the last.
    assert sum(losses[6:]) < sum(losses[:3]), losses
    assert "denoising step 1/3" in server.log()
    images = {p.name.split("_")[1]: pixels(p) for p in saved_images(server, entry)}
    assert set(images) == {"clip", "before", "after"}, images.keys()
    assert abs(images["before"] - images["after"]).mean() > 0.5, "training changed the picture"


def test_vision_cancel_saves_then_queueing_again_resumes_exactly(server):
    def prompt(prefix: str, name: str, steps: int) -> dict:
        return tiny(
            workflow("sdxl_qwen_train_vision"),
            prefix=prefix,
            adapter_name=name,
            steps=steps,
            save_every=100000,
            resolution=64,
            denoise_steps=3,
            schedule="constant",
            warmup_steps=0,
        )

    marker = "step 1/100000  denoising step 1/3"  # the first step, logged
    seen = server.log().count(marker)
    pid = server.queue(prompt("e2e_vcancel", "e2e_vcancel", 100000))
    t0 = time.time()
    while server.log().count(marker) == seen:
        assert time.time() - t0 < 120, server.log()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    status, _ = server.post("/interrupt", {})
    assert status == 200
    entry = server.wait(pid, timeout=120)
    assert entry["status"]["status_str"] == "error"
    folder = server.base / "models" / "qwenclip" / "e2e_vcancel"
    stopped = run_state(folder)["step"]
    assert stopped >= 1

    server.run(prompt("e2e_vresume", "e2e_vcancel", stopped + 3))
    resumed = run_state(folder)
    assert [s for s, _ in resumed["losses"]] == list(range(1, stopped + 4))

    # The same in the middle of a trajectory for certain (where the stop above lands depends
    # on timing): a run of 4 steps (3 per trajectory) queued again for 7 walks its second
    # trajectory on from step 1, replaying the teacher's step 0 in a fresh judge.
    server.run(prompt("e2e_vext4", "e2e_vext", 4))
    server.run(prompt("e2e_vext7", "e2e_vext", 7))
    extended = run_state(server.base / "models" / "qwenclip" / "e2e_vext")
    server.run(prompt("e2e_vstraight", "e2e_vstraight", max(stopped + 3, 7)))
    straight = run_state(server.base / "models" / "qwenclip" / "e2e_vstraight")
    assert [s for s, _ in extended["losses"]] == list(range(1, 8))
    for name, run in ((f"cancelled at {stopped}", resumed), ("extended at 4", extended)):
        for (s, a), (_, b) in zip(straight["losses"], run["losses"], strict=False):
            assert abs(a - b) <= 1e-5 * abs(a), f"step {s}: {a} straight, {b} {name} and resumed"


def test_vision_without_a_model_is_one_clear_error_and_the_server_goes_on(server):
    prompt = tiny(
        workflow("sdxl_qwen_train_vision"), prefix="e2e_nomodel", adapter_name="e2e_nomodel", steps=1
    )
    train = next(k for k, n in prompt.items() if n["class_type"] == "QwenAdapterTrain")
    del prompt[train]["inputs"]["model"]
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    text = json.dumps(entry["status"]["messages"])
    assert "connect the SDXL checkpoint's MODEL" in text, text[:2000]
    server.run(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_after_error"))


def _tiny_sd15_unet(path: Path) -> None:
    """An SD1.5-shaped UNet file that ComfyUI's Load Diffusion Model detects as SD1.5: its
    detection wants SD1.5's 320 channels and 768-wide context, nothing more, so one level with
    one resnet and one transformer keeps it at 26M values."""
    import comfy.supported_models
    from safetensors.torch import save_file

    unet = {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": None,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [1],
        "transformer_depth": [1],
        "channel_mult": [1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1],
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
        "num_head_channels": -1,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    model = comfy.supported_models.SD15(unet).get_model({})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.diffusion_model.state_dict().items()}, str(path))


def test_vision_with_an_sd15_model_is_one_clear_error_and_the_server_goes_on(server):
    name = "qwenclip_tiny_sd15.safetensors"
    _tiny_sd15_unet(server.base / "models" / "diffusion_models" / name)
    prompt = tiny(workflow("sdxl_qwen_train_vision"), prefix="e2e_sd15", adapter_name="e2e_sd15", steps=1)
    prompt["990"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    train = next(k for k, n in prompt.items() if n["class_type"] == "QwenAdapterTrain")
    prompt[train]["inputs"]["model"] = ["990", 0]
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "QwenAdapterTrain", error
    message = error["exception_message"]
    for part in ("needs the MODEL of an SDXL checkpoint", "this MODEL is BaseModel with context 768"):
        assert part in message, message
    assert "Traceback" not in message and len(message) < 600, message
    assert not (server.base / "models" / "qwenclip" / "e2e_sd15").exists(), "a run folder was started"
    server.run(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_after_sd15"))


def test_free_releases_our_memory(server):
    server.run(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_free"))
    s = server.get("/qwenclip/status")
    assert s["memory"]["cpu_bytes"] > 0 and s["live_encoders"] >= 1

    def until(cond, what, nudge=None):
        t0 = last = time.time()
        while time.time() - t0 < 60:
            s = server.get("/qwenclip/status")
            if cond(s):
                return s
            if nudge and time.time() - last > 5:
                nudge()
                last = time.time()
            time.sleep(0.3)
        raise AssertionError(f"{what}: {s}")

    assert server.post("/free", {"unload_models": True})[0] == 200
    until(lambda s: s["memory"]["cpu_bytes"] == 0, "unload_models released the weights")
    assert "qwenclip: released encoder weights (unload_all_models)" in server.log()
    assert server.post("/free", {"free_memory": True})[0] == 200
    # A handle goes when Python collects the last encoder holding it. ComfyUI collects garbage
    # once, right after dropping its caches; an encoder caught in a reference cycle that only
    # became garbage later (ComfyUI keeps tracebacks of failed nodes in locals) waits for the
    # next collection, which another /free starts.
    until(
        lambda s: s["live_encoders"] == 0,
        "free_memory dropped ComfyUI's caches and our handles",
        nudge=lambda: server.post("/free", {"free_memory": True}),
    )
    assert "qwenclip: freed encoder" in server.log()
    # and everything still works afterwards
    server.run(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_after_free"))


# -- what artists type: weights, trigger words through the CLIP branch, embedding: names ----------


def _picture(server, prompt: dict):
    images = saved_images(server, server.run(prompt))
    assert len(images) == 1
    return pixels(images[0])


def test_a_weighted_prompt_runs_and_the_weight_is_read_not_passed_as_text(server):
    import numpy as np

    def render(text: str, prefix: str):
        return _picture(server, with_prompt(tiny(workflow("sdxl_qwen_text_to_image"), prefix=prefix), text))

    plain = render("a red cube left of a blue sphere", "e2e_w_plain")
    weighted = render("a (red:1.6) cube left of a ((blue sphere))", "e2e_w_weighted")
    one = render("a (red:1.0) cube left of a blue sphere", "e2e_w_one")
    assert np.array_equal(one, plain), (
        "weight 1: the brackets are parsed away, the picture is the plain prompt's"
    )
    assert np.abs(weighted - plain).mean() > 0.5, "the weights changed nothing"


def test_a_malformed_weight_fails_the_node_with_the_span_and_the_server_goes_on(server):
    graph = with_prompt(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_badweight"), "a (red:abc) cube")
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "QwenTextEncodeSDXL"
    assert "red" in error["exception_message"] and "abc" in error["exception_message"], error
    server.run(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_after_badweight"))


def _trigger_graph(server, prefix: str, **positive) -> dict:
    """workflows/sdxl_qwen_lora_trigger on tiny models, with a LoRA on MODEL and CLIP."""
    lora = "qwenclip_tiny_lora_clip.safetensors"
    if not (server.base / "models" / "loras" / lora).is_file():
        assert _tiny_lora(server.base / "models" / "loras" / lora, clip=True) >= 8
    prompt = tiny(workflow("sdxl_qwen_lora_trigger"), prefix=prefix)
    for node in prompt.values():
        if node["class_type"] == "LoraLoader":
            node["inputs"]["lora_name"] = lora
        if node["class_type"] == "QwenTextEncodeSDXL" and "clip" in node["inputs"]:
            node["inputs"].update(positive)
    return prompt


def test_the_lora_trigger_workflow_sends_the_trigger_through_the_loras_clip(server):
    import numpy as np

    graph = _trigger_graph(server, "e2e_trigger")
    assert sum(n["class_type"] == "LoraLoader" for n in graph.values()) == 1
    picture = _picture(server, graph)
    log = server.log()
    assert "lora key not loaded" not in log, "every key of the LoRA, UNet and CLIP, was applied"
    without = _picture(server, _trigger_graph(server, "e2e_trigger_none", clip_text=""))
    assert np.abs(picture - without).mean() > 0.5, "the trigger words changed nothing"
    # the CLIP tokens come from the LoRA'd CLIP: its CLIP strength changes the picture
    graph = _trigger_graph(server, "e2e_trigger_clip0")
    next(n for n in graph.values() if n["class_type"] == "LoraLoader")["inputs"]["strength_clip"] = 0.0
    assert np.abs(picture - _picture(server, graph)).mean() > 0.5, "the LoRA's CLIP part was not used"


def test_an_embedding_name_goes_through_the_clip_branch_to_the_picture(server):
    import numpy as np
    from safetensors.torch import save_file

    def embedding(seed: int) -> None:  # a tiny SDXL textual inversion: 2 vectors per CLIP
        g = torch.Generator().manual_seed(seed)
        save_file(
            {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)},
            str(server.base / "models" / "embeddings" / "e2e_emb.safetensors"),
        )

    text = "a photo of a red fox in snow, embedding:e2e_emb"
    embedding(7)
    picture = _picture(server, _trigger_graph(server, "e2e_emb", text=text, clip_text=""))
    log = server.log()
    assert "embedding:e2e_emb: a CLIP textual inversion cannot feed the LLM" in log
    assert "embedding:e2e_emb does not exist" not in log, "ComfyUI's CLIP loaded it"
    # the embedding's vectors, not its name, reach the picture: other vectors, another picture
    embedding(8)
    assert server.post("/free", {"free_memory": True})[0] == 200
    other = _picture(server, _trigger_graph(server, "e2e_emb_other", text=text, clip_text=""))
    assert np.abs(picture - other).mean() > 0.5, "the embedding's vectors changed nothing"
    # no CLIP connected: stripped with a warning, the picture is the prompt without it
    graph = with_prompt(tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_emb_noclip"), text)
    alone = _picture(server, graph)
    again = _picture(
        server,
        with_prompt(
            tiny(workflow("sdxl_qwen_text_to_image"), prefix="e2e_emb_noclip2"), text.split(", emb")[0]
        ),
    )
    assert np.array_equal(alone, again)
    assert "connect the checkpoint's CLIP to this node's clip input" in server.log()
