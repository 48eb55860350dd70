"""One training run, every host: the ComfyUI node and the `qwenclip` command read a caption
folder the same way and continue each other's runs exactly.

The teacher here is the tests' tiny SDXL saved as a single-file checkpoint by ComfyUI itself:
the command line caches its CLIP's targets with our teacher, and the node gets the very same
values through a stand-in CLIP that reads that cache, so both hosts train on identical
targets and any difference would be the run's own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import qwenclip
import torch
from conftest import Progress

SETTINGS = dict(
    steps=6,
    batch_size=2,
    grad_accum=2,
    lr_lora=1e-3,
    lr_resampler=1e-3,
    save_every=100,
    seed=3,
    lora_r=4,
    lora_alpha=4.0,
    resampler_width=64,
    resampler_heads=4,
    resampler_layers=1,
    resampler_ff_mult=2,
    warmup_steps=0,
    schedule="constant",
)


def _cli(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([os.environ["QWENCLIP_BIN"], *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _cli_settings(**over) -> list[str]:
    s = {**SETTINGS, **over}
    flags = {"warmup_steps": "warmup"}
    out = []
    for k, v in s.items():
        out += [f"--{flags.get(k, k).replace('_', '-')}", str(v)]
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(session_tmp, pack) -> Path:
    """The tiny SDXL (UNet, CLIP, VAE) as ComfyUI's own save writes a checkpoint."""
    import comfy.sd

    path = session_tmp / "tiny_sdxl.safetensors"
    if not path.is_file():
        d = pack.demo
        comfy.sd.save_checkpoint(str(path), d.tiny_model(), d.tiny_clip(), d.tiny_vae())
    return path


@pytest.fixture(scope="module")
def caption_folder(comfy_dirs) -> Path:
    """A mixed folder: a list of prompts, a kohya image caption over two lines, a .caption file,
    a .jsonl, comments, blank lines and duplicates."""
    d = comfy_dirs["input"] / "hosts" / "mixed"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "prompts.txt").write_text(
        "a red cube left of a blue sphere\n# a comment\n\na lighthouse under the stars\n"
        "a bowl of ramen, top view\na red cube left of a blue sphere\n"
    )
    (d / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (d / "img01.txt").write_text("portrait of an old fisherman,\n  oil painting\n")
    (d / "sub" / "cat.caption").write_text("a (cat) sitting under a wooden table")
    (d / "sub" / "more.jsonl").write_text(
        '{"caption": "a green bicycle against a brick wall"}\n\n{"text": "a bowl of ramen, top view"}\n'
        '{"caption": "two dogs running on a beach"}\n'
    )
    return d


@pytest.fixture(scope="module")
def cache(session_tmp, tiny_checkpoint, caption_folder) -> Path:
    out = session_tmp / "hosts-cache"
    if not (out / "manifest.json").is_file():
        _cli("cache-targets", "--teacher", tiny_checkpoint, "--captions", caption_folder, "--out", out)
    return out


class CacheClip:
    """A stand-in for ComfyUI's CLIP that answers with a target cache's values (the node
    escapes `(`, `)` and `\\` for CLIP; the cache holds the plain captions)."""

    def __init__(self, cache_dir: Path):
        from safetensors import safe_open

        manifest = json.loads((cache_dir / "manifest.json").read_text())
        self.targets = {}
        for shard in manifest["shards"]:
            with safe_open(str(cache_dir / shard["file"]), "pt") as f:
                e, p, idx = f.get_tensor("prompt_embeds"), f.get_tensor("pooled"), f.get_tensor("index")
            for k, i in enumerate(idx.tolist()):
                self.targets[manifest["captions"][i]] = (e[k], p[k])

    def tokenize(self, text: str) -> str:
        out, chars = [], iter(text)
        for c in chars:
            out.append(next(chars, "") if c == "\\" else c)
        return "".join(out)

    def encode_from_tokens(self, caption: str, return_pooled: bool = False):
        e, p = self.targets[caption]
        return e[None].clone(), p[None].clone()


def _base_path(pack) -> str:
    return pack.nodes.base_models()["qwen3-tiny"]


def _node_train(pack, clip, name: str, progress_hook, cancel_at=None, **over):
    import comfy.model_management as mm

    encoder = pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "none", "cpu", "f32")[0]
    progress_hook(Progress(cancel_at=cancel_at))
    args = dict(captions_folder="hosts/mixed", captions_text="", init="scratch", **{**SETTINGS, **over})
    if cancel_at is None:
        return pack.nodes.QwenAdapterTrain().train(encoder, clip, name, unique_id="9", **args)
    with pytest.raises(mm.InterruptProcessingException):
        pack.nodes.QwenAdapterTrain().train(encoder, clip, name, unique_id="9", **args)


def _run_folder(pack, name: str) -> Path:
    return Path(pack.nodes._paths("qwenclip")[0]) / name


def _checkpoint_state(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "checkpoint.safetensors"), "pt") as f:
        return json.loads(f.metadata()["qwenclip.trainer"])


def _adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in ("adapter_model.safetensors", "resampler.safetensors"):
        out.update({f"{f}:{k}": v for k, v in load_file(str(folder / "adapter" / f)).items()})
    return out


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _adapter_tensors(a), _adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k}: the continued run differs from the uninterrupted one"


def test_one_caption_folder_gives_the_cli_and_the_node_the_same_captions(pack, caption_folder, cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    node = pack.library.get().captions_read([str(caption_folder)])
    assert node["captions"] == manifest["captions"]
    assert node["captions"] == [
        "portrait of an old fisherman, oil painting",  # img01.txt: the image's caption, joined
        "a red cube left of a blue sphere",
        "a lighthouse under the stars",
        "a bowl of ramen, top view",
        "a (cat) sitting under a wooden table",
        "a green bicycle against a brick wall",
        "two dogs running on a beach",
    ]
    assert (node["duplicates"], node["empty"]) == (2, 1)


def test_our_teacher_on_the_checkpoint_comfyui_saved_gives_comfyui_clip_targets(cache, teacher_clip):
    """The command line's teacher (candle) and ComfyUI's CLIP (torch) on the same weights."""
    stand_in = CacheClip(cache)
    for caption in ["a red cube left of a blue sphere", "two dogs running on a beach"]:
        want_e, want_p = teacher_clip.encode_from_tokens(teacher_clip.tokenize(caption), return_pooled=True)
        got_e, got_p = stand_in.encode_from_tokens(caption)
        assert torch.allclose(got_e, want_e.float(), atol=1e-4), (got_e - want_e).abs().max()
        assert torch.allclose(got_p, want_p.float(), atol=1e-4), (got_p - want_p).abs().max()


@pytest.fixture(scope="module")
def straight(pack, cache, session_tmp) -> Path:
    """The uninterrupted reference: six steps on the command line."""
    out = session_tmp / "hosts-straight"
    if not (out / "checkpoint.safetensors").is_file():
        _cli("train", "--model", _base_path(pack), "--cache", cache, "--out", out, *_cli_settings())
    return out


def test_a_run_the_node_started_and_cancelled_ends_on_the_command_line_exactly(
    pack, cache, straight, progress_hook
):
    _node_train(pack, CacheClip(cache), "hosts_node_first", progress_hook, cancel_at=3)
    folder = _run_folder(pack, "hosts_node_first")
    state = _checkpoint_state(folder)
    assert state["t"] == 3 and state["extra"]["captions"]["count"] == 7
    manifest = json.loads((cache / "manifest.json").read_text())
    assert state["extra"]["captions"]["fingerprint"] == manifest["captions_fingerprint"]
    r = _cli("train", "--model", _base_path(pack), "--cache", cache, "--out", folder, "--resume", folder)
    assert _checkpoint_state(folder)["t"] == 6, r.stderr[-2000:]
    _assert_same_adapter(folder, straight)


def test_a_run_the_command_line_started_ends_in_the_node_exactly(pack, cache, straight, progress_hook):
    folder = _run_folder(pack, "hosts_cli_first")
    _cli("train", "--model", _base_path(pack), "--cache", cache, "--out", folder, *_cli_settings(steps=3))
    assert _checkpoint_state(folder)["t"] == 3
    _, image = _node_train(pack, CacheClip(cache), "hosts_cli_first", progress_hook)
    assert _checkpoint_state(folder)["t"] == 6
    _assert_same_adapter(folder, straight)
    assert image.std() > 0


def test_a_resume_with_another_adapter_shape_is_refused_naming_the_setting(pack, cache, progress_hook):
    folder = _run_folder(pack, "hosts_shape")
    _cli("train", "--model", _base_path(pack), "--cache", cache, "--out", folder, *_cli_settings(steps=1))
    with pytest.raises(qwenclip.QwenclipError, match=r"resampler_width = 128 \(the run has 64\)"):
        _node_train(pack, CacheClip(cache), "hosts_shape", progress_hook, resampler_width=128)
