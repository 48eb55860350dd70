"""The node pack in a real InvokeAI: registered at start-up, its conditioning run through an
SDXL graph (denoise latents -> latents to image) on a tiny SDXL model to an image, and its
errors reported on the queue item while the server carries on."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

NODE = "qwenclip_sdxl_text_encode"
SIZE = 64


@pytest.fixture(scope="module")
def sdxl_model(server, tiny_sdxl_dir) -> dict:
    """The tiny SDXL folder installed through InvokeAI's model manager (its probe decides the type)."""
    job = server.install_model(tiny_sdxl_dir, "tiny-sdxl")
    # A refusal by InvokeAI's probe lands here, in its own words.
    assert job["status"] == "completed", f"{job['error_reason']}: {job['error']}\n{job['error_traceback']}"
    cfg = job["config_out"]
    assert (cfg["base"], cfg["type"], cfg["format"]) == ("sdxl", "main", "diffusers"), cfg
    return {k: cfg[k] for k in ("key", "hash", "name", "base", "type")}


def encode_node(node_id: str, prompt: str, tiny_qwen: dict, **kw) -> dict:
    return {
        "id": node_id,
        "type": NODE,
        "prompt": prompt,
        "model": tiny_qwen["model"],
        "adapter": tiny_qwen["adapter"],
        "original_width": SIZE,
        "original_height": SIZE,
        "target_width": SIZE,
        "target_height": SIZE,
        **kw,
    }


def edge(src: str, src_field: str, dst: str, dst_field: str) -> dict:
    return {
        "source": {"node_id": src, "field": src_field},
        "destination": {"node_id": dst, "field": dst_field},
    }


def sdxl_graph(model: dict, positive: dict, negative: dict, seed: int = 7) -> dict:
    """What InvokeAI's SDXL text-to-image graph is, with Qwen nodes in place of its prompt nodes."""
    nodes = [
        {"id": "loader", "type": "sdxl_model_loader", "model": model},
        positive,
        negative,
        {"id": "noise", "type": "noise", "seed": seed, "width": SIZE, "height": SIZE, "use_cpu": True},
        {
            "id": "denoise",
            "type": "denoise_latents",
            "steps": 3,
            "cfg_scale": 5.0,
            "scheduler": "euler",
            "denoising_start": 0.0,
            "denoising_end": 1.0,
        },
        {"id": "l2i", "type": "l2i", "fp32": True, "is_intermediate": False},
    ]
    edges = [
        edge("loader", "unet", "denoise", "unet"),
        edge(positive["id"], "conditioning", "denoise", "positive_conditioning"),
        edge(negative["id"], "conditioning", "denoise", "negative_conditioning"),
        edge("noise", "noise", "denoise", "noise"),
        edge("denoise", "latents", "l2i", "latents"),
        edge("loader", "vae", "l2i", "vae"),
    ]
    return {"id": f"qwenclip-{time.monotonic_ns()}", "nodes": {n["id"]: n for n in nodes}, "edges": edges}


def output(item: dict, node_id: str) -> dict:
    session = item["session"]
    (prepared,) = session["source_prepared_mapping"][node_id]
    return session["results"][prepared]


def completed(item: dict) -> dict:
    assert item["status"] == "completed", (
        f"{item['status']}: {item.get('error_type')}: {item.get('error_message')}"
    )
    return item


def image(server, item: dict) -> np.ndarray:
    from PIL import Image

    out = output(item, "l2i")
    assert out["type"] == "image_output" and (out["width"], out["height"]) == (SIZE, SIZE), out
    png = server.get(f"/api/v1/images/i/{out['image']['image_name']}/full").content
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def saved(server, kind: str, name: str):
    """An object a node saved: InvokeAI keeps conditioning and latents in temp folders under outputs/."""
    from invokeai.backend.stable_diffusion.diffusion.conditioning_data import (
        BasicConditioningInfo,
        ConditioningFieldData,
        SDXLConditioningInfo,
    )

    (path,) = Path(server.root, "outputs", kind).glob(f"tmp*/{name}")
    with torch.serialization.safe_globals(
        [ConditioningFieldData, BasicConditioningInfo, SDXLConditioningInfo]
    ):
        return torch.load(path, weights_only=True)


def test_node_pack_is_registered(server):
    assert "Loaded 1 node pack from" in server.log() and "qwenclip_nodes" in server.log(), server.log()
    schemas = server.get("/openapi.json").json()["components"]["schemas"]
    node = schemas["QwenTextEncodeSDXLInvocation"]
    assert node["title"] == "Qwen Text Encode (SDXL)" and node["node_pack"] == "qwenclip_nodes"
    assert node["properties"]["type"]["default"] == NODE
    assert node["output"]["$ref"].endswith("/ConditioningOutput")
    inputs = {k for k, v in node["properties"].items() if v.get("field_kind") == "input"}
    assert {"prompt", "model", "adapter", "original_width", "target_height", "crop_top", "mask"} <= inputs


def test_text_to_image_through_the_queue(server, sdxl_model, tiny_qwen):
    def run(prompt: str) -> tuple[dict, np.ndarray]:
        graph = sdxl_graph(
            sdxl_model, encode_node("positive", prompt, tiny_qwen), encode_node("negative", "", tiny_qwen)
        )
        # Every node computed afresh: InvokeAI would otherwise answer a repeated node from its cache.
        for node in graph["nodes"].values():
            node["use_cache"] = False
        t0 = time.monotonic()
        item = completed(server.run(graph))
        print(f"graph for {prompt!r}: {time.monotonic() - t0:.1f} s")
        return item, image(server, item)

    loads = server.log().count("Qwen Text Encode: loading")
    item, red = run("a red cube left of a blue sphere")
    _, cat = run("a cat sitting under a wooden table")
    _, red_again = run("a red cube left of a blue sphere")
    assert server.log().count("Qwen Text Encode: loading") - loads <= 1, "the encoder should be loaded once"

    # The conditioning is what the library gives for the prompt, with the size conditioning
    # InvokeAI's own SDXL prompt node computes; the empty negative prompt is zeros, as there.
    import qwenclip

    with qwenclip.Encoder(
        model=tiny_qwen["model"], adapter=tiny_qwen["adapter"], device="cpu", dtype="f32"
    ) as enc:
        embeds, pooled = enc.encode(["a red cube left of a blue sphere"])
    (pos,) = saved(
        server, "conditioning", output(item, "positive")["conditioning"]["conditioning_name"]
    ).conditionings
    (neg,) = saved(
        server, "conditioning", output(item, "negative")["conditioning"]["conditioning_name"]
    ).conditionings
    assert type(pos).__name__ == "SDXLConditioningInfo"
    assert pos.embeds.shape == (1, 77, 2048) and pos.pooled_embeds.shape == (1, 1280)
    torch.testing.assert_close(pos.embeds, embeds)
    torch.testing.assert_close(pos.pooled_embeds, pooled)
    assert pos.add_time_ids.tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]]
    assert not neg.embeds.any() and not neg.pooled_embeds.any()

    # The denoised latents (before the VAE turns them into 8-bit pixels) are finite numbers.
    latents = saved(server, "tensors", output(item, "denoise")["latents"]["latents_name"])
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latents).all(), latents
    for img in (red, cat):
        assert img.shape == (SIZE, SIZE, 3) and img.std() > 1.0, (img.mean(), img.std())
    diff = np.abs(red - cat).mean()
    changed = (np.abs(red - cat).max(axis=2) > 0).mean()
    print(
        f"image stats: red mean {red.mean():.2f} std {red.std():.2f}; cat mean {cat.mean():.2f} std {cat.std():.2f}; "
        f"mean |red - cat| {diff:.3f}, pixels changed {changed:.0%}"
    )
    assert diff > 0.5, "another prompt should give another image"
    assert np.array_equal(red, red_again), "the same prompt and seed should give the same image"


def test_graph_validation_knows_the_output_type(server, sdxl_model, tiny_qwen):
    """InvokeAI checks edges against the node's declared types when a batch is enqueued."""
    graph = sdxl_graph(
        sdxl_model, encode_node("positive", "x", tiny_qwen), encode_node("negative", "", tiny_qwen)
    )
    graph["edges"] = [
        e for e in graph["edges"] if e["destination"] != {"node_id": "denoise", "field": "noise"}
    ]
    graph["edges"].append(edge("positive", "conditioning", "denoise", "noise"))
    r = server.enqueue(graph)
    assert r.status_code == 422, r.text
    assert "Edge source and target types do not match (positive.conditioning -> denoise.noise)" in r.text, (
        r.text
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"adapter": "/nonexistent/adapter"}, "/nonexistent/adapter"),
        ({"model": "  "}, "Qwen Text Encode: no model given"),
    ],
)
def test_errors_fail_the_item_not_the_server(server, sdxl_model, tiny_qwen, fields, message):
    graph = sdxl_graph(
        sdxl_model, encode_node("positive", "x", tiny_qwen, **fields), encode_node("negative", "", tiny_qwen)
    )
    item = server.run(graph)
    assert item["status"] == "failed", item["status"]
    print(f"{item['error_type']}: {item['error_message']}")
    assert message in item["error_message"], item["error_message"]
    assert server.alive() and server.get("/api/v1/app/version").json()["version"]


def test_missing_package_is_a_clear_error(monkeypatch):
    """Without qwenclip in InvokeAI's Python the node still loads; running it says what to install."""
    import importlib.util
    import sys

    from invokeai_server import PACK

    spec = importlib.util.spec_from_file_location(PACK.name, PACK / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, PACK.name, pack)
    spec.loader.exec_module(pack)
    monkeypatch.setitem(sys.modules, "qwenclip", None)  # import qwenclip -> ImportError
    node = pack.QwenTextEncodeSDXLInvocation(id="q", prompt="x", model="m", adapter="a")
    with pytest.raises(
        RuntimeError, match=r"uv pip install --python .+ qwenclip` or `.+ -m pip install qwenclip`"
    ):
        node.invoke(SimpleNamespace(logger=logging.getLogger("test")))
