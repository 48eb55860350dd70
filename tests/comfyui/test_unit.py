"""The node functions called directly, with real torch and ComfyUI's own modules (no server):
conditioning format, loader listings and error messages, library discovery, memory release,
and the training node's progress, saves, cancel and resume."""

from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import qwenclip
import torch
from conftest import COMFY, PACKAGE, PLUGIN, Progress

CAPTIONS = "\n".join(
    [
        "a red cube left of a blue sphere",
        "a lighthouse under the stars",
        "portrait of an old fisherman, oil painting",
        "a bowl of ramen, top view, photo",
        "(a cat) sitting under a wooden table",
    ]
)

SMALL = dict(
    lora_r=4,
    lora_alpha=4.0,
    resampler_width=64,
    resampler_heads=4,
    resampler_layers=1,
    resampler_ff_mult=2,
    init="scratch",
)


def _sdxl_text_encode(clip, text, w=1024, h=1024):
    """ComfyUI's own CLIPTextEncodeSDXL (a V3 node in 0.3.75)."""
    from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL

    out = CLIPTextEncodeSDXL.execute(clip, w, h, 0, 0, w, h, text, text)
    return out.result[0] if hasattr(out, "result") else out[0]


# -- the pack itself ------------------------------------------------------------------------------


def test_display_names_and_v1_api(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {
        "QwenEncoderLoader": "Qwen Encoder Loader",
        "QwenTextEncodeSDXL": "Qwen Text Encode (SDXL)",
        "QwenAdapterTrain": "Qwen Adapter Train",
        "QwenAdapterSelect": "Qwen Adapter Select",
        "QwenDemoTinySDXL": "Tiny SDXL (offline demo)",
    }
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert "required" in spec, name
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.FUNCTION and cls.CATEGORY.startswith("qwenclip")
        assert callable(getattr(cls(), cls.FUNCTION))
    assert (PLUGIN / "web" / "docs").is_dir()
    for name in pack.NODE_CLASS_MAPPINGS:
        assert (PLUGIN / "web" / "docs" / f"{name}.md").is_file(), f"help page for {name}"


def test_import_is_fast_and_loads_no_library():
    """In a fresh process that has what ComfyUI has already imported at that point, the pack
    imports in well under 0.5 s and does not load the library."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {COMFY!r})
        import comfy.cli_args; comfy.cli_args.args.cpu = True
        import torch, folder_paths, comfy.model_management, comfy.utils
        import importlib.util
        t = time.perf_counter()
        spec = importlib.util.spec_from_file_location({PACKAGE!r}, {str(PLUGIN / "__init__.py")!r},
                                                      submodule_search_locations=[{str(PLUGIN)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules[{PACKAGE!r}] = m; spec.loader.exec_module(m)
        dt = time.perf_counter() - t
        maps = open('/proc/self/maps').read()
        print(dt, '_lib.abi3.so' in maps or 'libqwenclip' in maps, m.library.loaded() is None)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dt, mapped, lazy = out.stdout.split()[-3:]
    assert float(dt) < 0.5, out.stdout
    assert mapped == "False" and lazy == "True"


# -- Qwen Encoder Loader --------------------------------------------------------------------------


def test_loader_lists_model_and_adapter_folders(pack):
    spec = pack.nodes.QwenEncoderLoader.INPUT_TYPES()["required"]
    assert "qwen3-tiny" in spec["base_model"][0]
    assert {"Qwen/Qwen3-4B", "Qwen/Qwen3-4B (download)"} & set(spec["base_model"][0])
    assert spec["adapter"][0][0] == "none" and "tiny" in spec["adapter"][0]
    assert spec["device"][0] == ["auto", "cpu", "cuda"]
    assert {"f32", "bf16"} <= set(spec["dtype"][0])


def test_loader_missing_model_says_where_to_put_it(pack, comfy_dirs):
    with pytest.raises(ValueError) as e:
        pack.nodes.QwenEncoderLoader().load("no-such-model", "none", "cpu", "f32")
    msg = str(e.value)
    assert "no-such-model" in msg and str(comfy_dirs["text_encoders"]) in msg and "hub id" in msg


def test_loader_missing_adapter_says_where_to_put_it(pack, comfy_dirs):
    with pytest.raises(ValueError) as e:
        pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "gone", "cpu", "f32")
    assert "gone" in str(e.value) and str(comfy_dirs["qwenclip"]) in str(e.value)


def test_loader_broken_model_folder_names_the_file(pack, comfy_dirs, tiny):
    bad = comfy_dirs["text_encoders"] / "broken"
    shutil.copytree(tiny["model"], bad, dirs_exist_ok=True)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    try:
        with pytest.raises(qwenclip.QwenclipError) as e:
            pack.nodes.QwenEncoderLoader().load("broken", "none", "cpu", "f32")
        assert "model.safetensors" in str(e.value)
    finally:
        shutil.rmtree(bad)


@pytest.fixture(scope="session")
def gguf_base(comfy_dirs, tiny) -> Path:
    """The tiny model quantized to Q8_0 by `qwenclip quantize`, in text_encoders, next to a
    file that is not a model (must not be listed)."""
    te = comfy_dirs["text_encoders"]
    out = te / "qwen3-tiny-q8_0.gguf"
    subprocess.run(
        [
            os.environ["QWENCLIP_BIN"],
            "quantize",
            "--model",
            str(tiny["model"]),
            "--type",
            "q8_0",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (te / "readme.txt").write_text("not a model")
    return out


def test_loader_lists_gguf_files_under_its_own_key_and_leaves_shared_sets_alone(pack, gguf_base):
    import folder_paths

    shared_exts = {
        k: set(v[1]) for k, v in folder_paths.folder_names_and_paths.items() if k != "qwenclip_gguf"
    }
    choices = pack.nodes.QwenEncoderLoader.INPUT_TYPES()["required"]["base_model"][0]
    assert "qwen3-tiny-q8_0.gguf" in choices and "qwen3-tiny" in choices
    assert not any(c.endswith(".txt") for c in choices)
    paths, exts = folder_paths.folder_names_and_paths["qwenclip_gguf"]
    assert exts == {".gguf"} and str(gguf_base.parent) in paths
    assert folder_paths.get_full_path("qwenclip_gguf", "qwen3-tiny-q8_0.gguf") == str(gguf_base)
    assert {
        k: set(v[1]) for k, v in folder_paths.folder_names_and_paths.items() if k != "qwenclip_gguf"
    } == shared_exts
    assert ".gguf" not in folder_paths.folder_names_and_paths["text_encoders"][1]


def test_loader_encodes_with_a_gguf_base_close_to_f32(pack, gguf_base, encoder):
    """Same adapter on the Q8_0 file: conditioning within docs/gguf.md's Q8_0 limit (cos 0.9999)."""
    q = pack.nodes.QwenEncoderLoader().load("qwen3-tiny-q8_0.gguf", "tiny", "cpu", "f32")[0]
    text = "a red cube left of a blue sphere"
    got = pack.nodes.QwenTextEncodeSDXL().encode(q, text, 1024, 1024, 0, 0, 1024, 1024)[0]
    want = pack.nodes.QwenTextEncodeSDXL().encode(encoder, text, 1024, 1024, 0, 0, 1024, 1024)[0]
    assert got[0][0].shape == (1, 77, 2048) and got[0][1]["pooled_output"].shape == (1, 1280)
    assert not torch.equal(got[0][0], want[0][0]), "the quantized base was really used"
    cos = torch.nn.functional.cosine_similarity
    assert cos(got[0][0].flatten(), want[0][0].flatten(), dim=0) > 0.9999
    assert cos(got[0][1]["pooled_output"].flatten(), want[0][1]["pooled_output"].flatten(), dim=0) > 0.9999


def test_loader_asks_for_the_gguf_file_size_not_an_f32_estimate(pack, gguf_base, monkeypatch):
    import comfy.model_management as mm

    calls = []
    monkeypatch.setattr(mm, "free_memory", lambda need, dev, *a, **k: calls.append(need))
    pack.nodes.QwenEncoderLoader().load("qwen3-tiny-q8_0.gguf", "tiny", "cpu", "f32", max_tokens=77)
    assert calls == [gguf_base.stat().st_size]


def test_loader_broken_gguf_names_the_file(pack, comfy_dirs):
    bad = comfy_dirs["text_encoders"] / "truncated.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    try:
        assert "truncated.gguf" in pack.nodes.QwenEncoderLoader.INPUT_TYPES()["required"]["base_model"][0]
        with pytest.raises(qwenclip.QwenclipError) as e:
            pack.nodes.QwenEncoderLoader().load("truncated.gguf", "none", "cpu", "f32")
        assert "truncated.gguf" in str(e.value)
    finally:
        bad.unlink()


def test_cuda_device_on_a_cpu_build_is_a_clear_error(pack):
    lib = pack.library.get()
    if lib.has_cuda:
        pytest.skip("CUDA build")
    with pytest.raises(ValueError, match="CUDA build"):
        pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "tiny", "cuda", "f32")


def test_missing_library_every_node_says_how_to_install(pack, monkeypatch, tmp_path, encoder, teacher_clip):
    monkeypatch.setenv("QWENCLIP_LIB", str(tmp_path / "nowhere" / "libqwenclip.so"))
    qwenclip._native.reset()
    try:
        calls = [
            lambda: pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "tiny", "cpu", "f32"),
            lambda: pack.nodes.QwenTextEncodeSDXL().encode(encoder, "x", 1024, 1024, 0, 0, 1024, 1024),
            lambda: pack.nodes.QwenAdapterSelect().select(encoder, "tiny"),
            lambda: pack.nodes.QwenAdapterTrain().train(
                encoder, teacher_clip, "x", "none (use captions_text)", "a", 1, 1, 1, 1e-4, 5e-4, 1, 0
            ),
        ]
        messages = set()
        for call in calls:
            with pytest.raises(pack.library.LibraryMissing) as e:
                call()
            messages.add(str(e.value))
        assert len(messages) == 1, messages  # one message, the same everywhere
        msg = messages.pop()
        assert "QWENCLIP_LIB" in msg and "nowhere" in msg
        assert f"{sys.executable} -m pip install -r {PLUGIN / 'requirements.txt'}" in msg
    finally:
        monkeypatch.undo()
        qwenclip._native.reset()
        pack.library.get()


def test_pack_without_the_qwenclip_package_loads_and_says_how_to_install(pack, monkeypatch):
    """A pack copied into custom_nodes without `pip install -r requirements.txt`: ComfyUI still
    imports it (the nodes are listed) and running one names the missing package and the fix."""
    monkeypatch.setitem(sys.modules, "qwenclip", None)  # `import qwenclip` raises ImportError
    with pytest.raises(pack.library.LibraryMissing) as e:
        pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "tiny", "cpu", "f32")
    msg = str(e.value)
    assert "the qwenclip Python package is not installed" in msg and "requirements.txt" in msg
    assert pack.library.loaded() is None


def test_library_search_order_and_cuda_preference(monkeypatch, tmp_path):
    """From a source checkout (no library in the package): a CUDA build only when it loads, has
    CUDA and torch sees a GPU; a file that does not load falls back to the CPU build."""
    native = qwenclip._native
    real = qwenclip.library().path
    here = tmp_path / "release"
    here.mkdir()
    os.symlink(real, here / "libqwenclip.so")
    (here / "libqwenclip_cuda.so").write_bytes(b"\x7fELF broken")
    monkeypatch.delenv("QWENCLIP_LIB", raising=False)
    monkeypatch.setattr(native, "packaged_library", lambda: None)
    monkeypatch.setattr(native, "checkout_places", lambda: [here, tmp_path / "debug"])
    monkeypatch.setattr(native, "_cuda_wanted", lambda: True)
    lib = native.find()
    assert lib.path == here / "libqwenclip.so"

    # A loadable CUDA build wins when a GPU is there.
    class Fake:
        def __init__(self, path):
            if b"broken" in Path(path).read_bytes()[:16]:
                raise OSError("bad ELF")
            self.path, self.has_cuda = Path(path), "cuda" in Path(path).name

    (here / "libqwenclip_cuda.so").unlink()
    os.symlink(real, here / "libqwenclip_cuda.so")
    monkeypatch.setattr(native, "Library", Fake)
    assert native.find().path.name == "libqwenclip_cuda.so"
    monkeypatch.setattr(native, "_cuda_wanted", lambda: False)
    assert native.find().path.name == "libqwenclip.so"
    # The wheel's own library comes first, and when it fails that is the answer (the user
    # installed that build), not another library found elsewhere.
    monkeypatch.setattr(native, "packaged_library", lambda: here / "libqwenclip_cuda.so")
    assert native.find().path.name == "libqwenclip_cuda.so"
    (here / "libqwenclip_cuda.so").unlink()
    (here / "libqwenclip_cuda.so").write_bytes(b"\x7fELF broken")
    with pytest.raises(native.LibraryMissing, match="could not be loaded: bad ELF"):
        native.find()
    # Nothing anywhere: the message lists every place looked at.
    monkeypatch.setattr(native, "packaged_library", lambda: None)
    monkeypatch.setattr(native, "checkout_places", lambda: [tmp_path / "empty"])
    with pytest.raises(native.LibraryMissing) as e:
        native.find()
    assert str(tmp_path / "empty" / "libqwenclip.so") in str(e.value) and "pip install qwenclip" in str(
        e.value
    )


def test_library_refuses_another_abi(pack, monkeypatch):
    lib = pack.library.get()
    monkeypatch.setattr(qwenclip._native, "ABI_VERSION", 999)
    with pytest.raises(OSError, match="interface version"):
        qwenclip.Library(lib.path)


# -- Qwen Text Encode (SDXL) ----------------------------------------------------------------------


def _check_same_format(ours, theirs):
    assert isinstance(ours, list) and len(ours) == len(theirs) == 1
    (c, d), (tc, td) = ours[0], theirs[0]
    assert (
        isinstance(c, torch.Tensor) and c.shape == tc.shape and c.dtype == tc.dtype and c.device == tc.device
    )
    assert set(d) == set(td), set(d) ^ set(td)
    for k, v in td.items():
        if isinstance(v, torch.Tensor):
            assert d[k].shape == v.shape and d[k].dtype == v.dtype and d[k].device == v.device, k
        else:
            assert type(d[k]) is type(v) and d[k] == v, k


def test_conditioning_is_exactly_clip_text_encode_sdxl_format(pack, encoder, teacher_clip):
    ours = pack.nodes.QwenTextEncodeSDXL().encode(
        encoder, "a lighthouse under the stars", 832, 1216, 16, 32, 832, 1216
    )[0]
    theirs = _sdxl_text_encode(teacher_clip, "a lighthouse under the stars", 832, 1216)
    theirs[0][1].update(crop_w=16, crop_h=32)
    _check_same_format(ours, theirs)
    cond, extra = ours[0]
    assert cond.shape == (1, 77, 2048) and cond.dtype == torch.float32
    assert extra["pooled_output"].shape == (1, 1280) and extra["pooled_output"].dtype == torch.float32
    assert torch.isfinite(cond).all() and cond.std() > 0


def test_conditioning_equals_the_library_and_the_empty_prompt_works(pack, encoder):
    lib = pack.library.get()
    a = pack.nodes.QwenTextEncodeSDXL().encode(encoder, "a red cube", 1024, 1024, 0, 0, 1024, 1024)[0]
    base = encoder.base
    cond = torch.zeros(1, 77, 2048)
    pooled = torch.zeros(1, 1280)
    with base.lock:
        base.select(encoder.adapter)
        lib.encode_into(
            base.handle, ["a red cube"], cond.data_ptr(), cond.numel(), pooled.data_ptr(), pooled.numel()
        )
    assert torch.equal(a[0][0], cond) and torch.equal(a[0][1]["pooled_output"], pooled)
    empty = pack.nodes.QwenTextEncodeSDXL().encode(encoder, "", 1024, 1024, 0, 0, 1024, 1024)[0]
    assert empty[0][0].shape == (1, 77, 2048) and not torch.equal(empty[0][0], cond)


def test_conditioning_goes_through_comfyui_nodes_and_sdxl_adm(pack, encoder, teacher_clip):
    import nodes

    ours = pack.nodes.QwenTextEncodeSDXL().encode(encoder, "a cat", 1024, 1024, 0, 0, 1024, 1024)[0]
    clip = _sdxl_text_encode(teacher_clip, "a dog")
    combined = nodes.ConditioningCombine().combine(ours, clip)[0]
    assert len(combined) == 2
    concat = nodes.ConditioningConcat().concat(ours, clip)[0]
    assert concat[0][0].shape == (1, 154, 2048)
    area = nodes.ConditioningSetArea().append(ours, 512, 512, 0, 0, 1.0)[0]
    assert area[0][1]["area"] == (64, 64, 0, 0)
    model = pack.demo.tiny_model().model
    y = model.encode_adm(**ours[0][1], device="cpu")
    assert y.shape == (1, 2816)


def test_encoder_without_adapter_explains(pack):
    bare = pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "none", "cpu", "f32")[0]
    with pytest.raises(ValueError, match="no adapter"):
        pack.nodes.QwenTextEncodeSDXL().encode(bare, "x", 1024, 1024, 0, 0, 1024, 1024)


# -- memory ---------------------------------------------------------------------------------------


def test_unload_all_models_releases_weights_and_gc_frees_handles(pack):
    import comfy.model_management as mm

    lib = pack.library.get()
    node = pack.nodes.QwenEncoderLoader()
    e = node.load("qwen3-tiny", "tiny", "cpu", "f32", max_tokens=64)[0]  # a base of its own
    pack.nodes.QwenTextEncodeSDXL().encode(e, "x", 1024, 1024, 0, 0, 1024, 1024)
    assert lib.memory()["cpu_bytes"] > 0
    assert getattr(mm.unload_all_models, "_qwenclip_hook", False)
    mm.unload_all_models()
    assert lib.memory()["cpu_bytes"] == 0  # released ...
    out = pack.nodes.QwenTextEncodeSDXL().encode(e, "x", 1024, 1024, 0, 0, 1024, 1024)[0]
    assert out[0][0].shape == (1, 77, 2048)  # ... and reloaded on the next encode
    handle = e.base.handle
    del e, out
    gc.collect()
    live = {b.handle for b in pack.encoder.live_bases()}
    assert handle not in live
    with pytest.raises(qwenclip.QwenclipError):  # freed for real
        lib.encoder_offload(handle)


def test_loaders_share_one_base_model(pack):
    a = pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "tiny", "cpu", "f32")[0]
    b = pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "none", "cpu", "f32")[0]
    c = pack.nodes.QwenAdapterSelect().select(b, "tiny")[0]
    assert a.base is b.base is c.base
    x = pack.nodes.QwenTextEncodeSDXL().encode(a, "x", 1024, 1024, 0, 0, 1024, 1024)[0][0][0]
    y = pack.nodes.QwenTextEncodeSDXL().encode(c, "x", 1024, 1024, 0, 0, 1024, 1024)[0][0][0]
    assert torch.equal(x, y)


# -- Qwen Adapter Train ---------------------------------------------------------------------------


def _train(pack, encoder, clip, name, steps, **kw):
    args = dict(
        captions_folder="none (use captions_text)",
        captions_text=CAPTIONS,
        steps=steps,
        batch_size=2,
        grad_accum=2,
        lr_lora=1e-3,
        lr_resampler=1e-3,
        save_every=2,
        seed=3,
    )
    args.update(SMALL)
    args.update(kw)
    return pack.nodes.QwenAdapterTrain().train(encoder, clip, name, unique_id="7", **args)


def _state(pack, name):
    """What a run folder says: the checkpoint's trainer state, and the loss per step."""
    from safetensors import safe_open

    folder = Path(pack.nodes._paths("qwenclip")[0]) / name
    with safe_open(str(folder / "checkpoint.safetensors"), "pt") as f:
        trainer = json.loads(f.metadata()["qwenclip.trainer"])
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [(x["step"], x["loss"]) for x in lines if "loss" in x]
    return {"step": trainer["t"], "trainer": trainer, "losses": losses}, folder


def test_train_progress_saves_and_outputs(pack, encoder, teacher_clip, progress_hook):
    hook = progress_hook(Progress())
    out_encoder, image = _train(pack, encoder, teacher_clip, "unit_run", steps=4)
    values = [v for v, t, _ in hook.calls]
    assert values[0] == 0 and values[-1] == 4 and values == sorted(values)
    assert all(t == 4 for _, t, _ in hook.calls)
    assert hook.calls[-1][2], "the last update carries the loss-curve preview"
    state, folder = _state(pack, "unit_run")
    assert state["step"] == 4 and [s for s, _ in state["losses"]] == [1, 2, 3, 4]
    assert state["trainer"]["config"]["grad_accum"] == 2 and state["trainer"]["micro"] == 0
    for f in (
        "checkpoint.safetensors",
        "metrics.jsonl",
        "loss.png",
        "adapter/qwenclip.json",
        "adapter/resampler.safetensors",
        "adapter/adapter_model.safetensors",
    ):
        assert (folder / f).is_file(), f
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    # the picture is the library's: the run folder's loss.png, pixel for pixel
    import numpy as np
    from PIL import Image

    png = torch.from_numpy(np.array(Image.open(folder / "loss.png").convert("RGB")))
    assert torch.equal((image[0] * 255).round().to(torch.uint8), png)
    # the output encoder carries the new adapter; the input encoder is unchanged
    adapter = str(folder / "adapter")
    assert out_encoder.adapter == adapter and encoder.adapter != adapter
    cond = pack.nodes.QwenTextEncodeSDXL().encode(out_encoder, "a lighthouse", 1024, 1024, 0, 0, 1024, 1024)[
        0
    ]
    assert cond[0][0].shape == (1, 77, 2048)
    # and it is listed for the loader
    assert "unit_run" in pack.nodes.QwenEncoderLoader.INPUT_TYPES()["required"]["adapter"][0]
    loaded = pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "unit_run", "cpu", "f32")[0]
    again = pack.nodes.QwenTextEncodeSDXL().encode(loaded, "a lighthouse", 1024, 1024, 0, 0, 1024, 1024)[0]
    assert torch.allclose(again[0][0], cond[0][0], atol=1e-5)


def test_train_cancel_saves_then_resume_matches_an_uninterrupted_run(
    pack, encoder, teacher_clip, progress_hook
):
    import comfy.model_management as mm

    progress_hook(Progress(cancel_at=3))
    with pytest.raises(mm.InterruptProcessingException):
        _train(pack, encoder, teacher_clip, "unit_cancel", steps=6, save_every=100)
    state, folder = _state(pack, "unit_cancel")
    assert state["step"] == 3, "Cancel saved the state it stopped at"
    assert (folder / "checkpoint.safetensors").is_file() and (folder / "adapter" / "qwenclip.json").is_file()

    hook = progress_hook(Progress())
    resumed, _ = _train(pack, encoder, teacher_clip, "unit_cancel", steps=6, save_every=100)
    assert hook.calls[0][0] == 3, "resumed from the saved step"
    state, _ = _state(pack, "unit_cancel")
    assert state["step"] == 6 and [s for s, _ in state["losses"]] == [1, 2, 3, 4, 5, 6]

    progress_hook(Progress())
    straight, _ = _train(pack, encoder, teacher_clip, "unit_straight", steps=6, save_every=100)
    a = pack.nodes.QwenTextEncodeSDXL().encode(resumed, "a bowl of ramen", 1024, 1024, 0, 0, 1024, 1024)[0]
    b = pack.nodes.QwenTextEncodeSDXL().encode(straight, "a bowl of ramen", 1024, 1024, 0, 0, 1024, 1024)[0]
    assert torch.allclose(a[0][0], b[0][0], atol=1e-5)
    s1, _ = _state(pack, "unit_straight")
    s2, _ = _state(pack, "unit_cancel")
    assert [round(x, 6) for _, x in s1["losses"]] == [round(x, 6) for _, x in s2["losses"]]


def test_train_finished_run_is_not_retrained(pack, encoder, teacher_clip, progress_hook):
    progress_hook(Progress())
    _train(pack, encoder, teacher_clip, "unit_done", steps=2)
    _, folder = _state(pack, "unit_done")
    before = (folder / "checkpoint.safetensors").stat().st_mtime_ns
    hook = progress_hook(Progress())
    enc2, image = _train(pack, encoder, teacher_clip, "unit_done", steps=2)
    assert (folder / "checkpoint.safetensors").stat().st_mtime_ns == before
    assert hook.calls[0][:2] == (2, 2) and image.shape[-1] == 3


def test_train_says_what_it_did_with_changed_settings(pack, encoder, teacher_clip, progress_hook, caplog):
    progress_hook(Progress())
    _train(pack, encoder, teacher_clip, "unit_notes", steps=2)
    _, folder = _state(pack, "unit_notes")
    before = (folder / "checkpoint.safetensors").stat().st_mtime_ns
    with caplog.at_level("WARNING", logger="qwenclip"):
        _train(pack, encoder, teacher_clip, "unit_notes", steps=1, seed=7)
    said = caplog.text
    assert "nothing to train" in said and "kept seed = 3 (asked 7)" in said, said
    assert (folder / "checkpoint.safetensors").stat().st_mtime_ns == before
    # a larger steps extends the finished run
    _train(pack, encoder, teacher_clip, "unit_notes", steps=4)
    assert _state(pack, "unit_notes")[0]["step"] == 4


def test_train_never_writes_over_an_adapter_it_cannot_resume(pack, encoder, teacher_clip, comfy_dirs):
    adapter = comfy_dirs["qwenclip"] / "tiny"
    files = {f.name: f.read_bytes() for f in adapter.iterdir() if f.is_file()}
    with pytest.raises(qwenclip.QwenclipError, match="already holds an adapter and no checkpoint"):
        _train(pack, encoder, teacher_clip, "tiny", steps=1)
    assert {f.name: f.read_bytes() for f in adapter.iterdir() if f.is_file()} == files


def test_train_reads_a_captions_folder(pack, comfy_dirs):
    d = comfy_dirs["input"] / "captions" / "set1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "001.txt").write_text("a red cube\n\n# a comment\n")
    (d / "002.caption").write_text("a blue sphere")
    (d / "notes.md").write_text("ignored")
    assert "captions/set1" in pack.nodes.caption_folders()
    caps = pack.library.get().captions_read([str(d)], "one more\n")["captions"]
    assert caps == ["a red cube", "a blue sphere", "one more"]


def test_train_errors_are_clear(pack, encoder, teacher_clip):
    with pytest.raises(qwenclip.QwenclipError, match="no captions"):
        _train(pack, encoder, teacher_clip, "unit_empty", steps=1, captions_text="\n \n")
    with pytest.raises(ValueError, match="not a usable folder name"):
        _train(pack, encoder, teacher_clip, "../escape", steps=1)

    class NotSdxl:  # an SD1.5-like CLIP: 768 wide
        def tokenize(self, text):
            return text

        def encode_from_tokens(self, tokens, return_pooled=False):
            return torch.zeros(1, 77, 768), torch.zeros(1, 768)

    with pytest.raises(ValueError, match="SDXL checkpoint"):
        _train(pack, encoder, NotSdxl(), "unit_sd15", steps=1)


def test_teacher_targets_come_from_comfyui_clip_and_are_cached(pack, teacher_clip):
    t = pack.training.Teacher(teacher_clip, (77, 2048, 1280))
    e, p = t.batch(["a cat", "a (dog)"])
    assert e.shape == (2, 77, 2048) and p.shape == (2, 1280)
    cond = _sdxl_text_encode(teacher_clip, "a cat")
    assert torch.allclose(e[0], cond[0][0][0], atol=1e-6)
    assert torch.allclose(p[0], cond[0][1]["pooled_output"][0], atol=1e-6)
    assert set(t.cache) == {"a cat", "a (dog)"}
    # parentheses are text for the teacher too, not a weight
    literal = teacher_clip.tokenize("a \\(dog\\)")
    assert torch.allclose(e[1], teacher_clip.encode_from_tokens(literal, return_pooled=True)[0][0], atol=1e-6)


def test_workflow_files_are_what_make_workflows_writes(tmp_path, monkeypatch):
    import make_workflows

    monkeypatch.setattr(make_workflows, "OUT", tmp_path)
    make_workflows.main()
    shipped = Path(make_workflows.ROOT) / "workflows"
    for f in sorted(tmp_path.iterdir()):
        assert f.read_text() == (shipped / f.name).read_text(), (
            f"{f.name}: run tests/comfyui/make_workflows.py"
        )


# -- install.py -----------------------------------------------------------------------------------


def _install(*args, env=None):
    return subprocess.run(
        [sys.executable, str(PLUGIN / "install.py"), *args], capture_output=True, text=True, env=env
    )


def test_install_copies_the_pack_and_names_the_library_the_nodes_will_use(tmp_path):
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    r = _install("--custom-nodes", str(nodes), "--copy", "--no-build")
    assert r.returncode == 0, r.stdout + r.stderr
    dest = nodes / "comfyui-qwenclip"
    assert (dest / "nodes.py").is_file() and (dest / "requirements.txt").is_file()
    assert f"from {qwenclip.library().path}" in r.stdout  # the installed wheel's
    # again: an earlier copy of the pack is replaced
    r = _install("--custom-nodes", str(nodes), "--copy", "--no-build")
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_links_and_refuses_to_replace_a_foreign_folder(tmp_path):
    nodes = tmp_path / "custom_nodes"
    (nodes / "comfyui-qwenclip").mkdir(parents=True)
    (nodes / "comfyui-qwenclip" / "something.py").write_text("")
    r = _install("--custom-nodes", str(nodes), "--no-build")
    assert r.returncode != 0 and "is not this node pack" in r.stderr
    r = _install("--custom-nodes", str(nodes), "--no-build", "--name", "qwenclip")
    assert r.returncode == 0, r.stderr
    assert (nodes / "qwenclip").is_symlink() and (nodes / "qwenclip").resolve() == PLUGIN
    r = _install("--custom-nodes", str(tmp_path / "nope"), "--no-build")
    assert r.returncode != 0 and "is not a folder" in r.stderr


def test_comfyui_memory_pressure_releases_our_weights(pack):
    import comfy.model_management as mm

    lib = pack.library.get()
    e = pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "tiny", "cpu", "f32")[0]
    pack.nodes.QwenTextEncodeSDXL().encode(e, "x", 1024, 1024, 0, 0, 1024, 1024)
    assert lib.memory()["cpu_bytes"] > 0
    mm.free_memory(1024, torch.device("cpu"))  # plenty of RAM: ours stays
    assert lib.memory()["cpu_bytes"] > 0
    mm.free_memory(1e30, torch.device("cpu"))  # more than there is: ours goes too
    assert lib.memory()["cpu_bytes"] == 0


def test_loader_asks_comfyui_for_room_first(pack, monkeypatch):
    import comfy.model_management as mm

    calls = []
    real = mm.free_memory
    monkeypatch.setattr(
        mm, "free_memory", lambda need, dev, *a, **k: (calls.append((need, dev)), real(need, dev, *a, **k))[1]
    )
    pack.nodes.QwenEncoderLoader().load("qwen3-tiny", "tiny", "cpu", "f32", max_tokens=77)
    assert calls and calls[0][0] > 10_000_000 and calls[0][1].type == "cpu"  # ~20 MB of f32 weights


# -- hub models -----------------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_are_listed_as_cached_or_to_download(pack, hf_cache, tiny):
    snap = hf_cache / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (hf_cache / "models--Qwen--Qwen3-0.6B" / "refs").mkdir()
    (hf_cache / "models--Qwen--Qwen3-0.6B" / "refs" / "main").write_text("abc123")
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(tiny["model"] / f, snap / f)
    listed = pack.nodes.QwenEncoderLoader.INPUT_TYPES()["required"]["base_model"][0]
    assert "Qwen/Qwen3-0.6B" in listed and "Qwen/Qwen3-4B (download)" in listed
    assert "Qwen/Qwen3-4B" not in listed and "Qwen/Qwen3-0.6B (download)" not in listed
    # the cached one loads from the cache, without the network
    enc = pack.nodes.QwenEncoderLoader().load("Qwen/Qwen3-0.6B", "tiny", "cpu", "f32")[0]
    assert enc.config["model"] == str(snap)


def test_a_hub_model_that_cannot_be_downloaded_says_how_to_get_it(pack, hf_cache, monkeypatch, comfy_dirs):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError) as e:
        pack.nodes.QwenEncoderLoader().load("Qwen/Qwen3-4B (download)", "tiny", "cpu", "f32")
    msg = str(e.value)
    assert "Qwen/Qwen3-4B is not in the Hugging Face cache" in msg, msg
    assert "huggingface-cli download Qwen/Qwen3-4B" in msg and str(comfy_dirs["text_encoders"]) in msg, msg
    assert "Dns" not in msg and "Traceback" not in msg


class FakeHub:
    """A local stand-in for huggingface.co serving one repository (the API calls and file
    downloads huggingface_hub makes), counting the bytes it sent."""

    def __init__(self, repo: str, files: dict[str, bytes]):
        import hashlib
        import http.server
        import threading

        self.repo, self.files, self.sent = repo, files, 0
        sha = "0" * 40
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _file(self):
                prefix = f"/{repo}/resolve/"
                if not self.path.startswith(prefix):
                    return None
                name = self.path[len(prefix) :].split("/", 1)[1]
                return name, files.get(name)

            def do_HEAD(self):
                hit = self._file()
                if not hit or hit[1] is None:
                    self.send_error(404)
                    return
                name, data = hit
                self.send_response(200)
                self.send_header("X-Repo-Commit", sha)
                self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_GET(self):
                if self.path.startswith(f"/api/models/{repo}"):
                    body = json.dumps(
                        {
                            "id": repo,
                            "sha": sha,
                            "siblings": [{"rfilename": n, "size": len(d)} for n, d in files.items()],
                        }
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                hit = self._file()
                if not hit or hit[1] is None:
                    self.send_error(404)
                    return
                data = hit[1]
                start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", sha)
                self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])
                hub.sent += len(data) - start

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


def test_a_hub_download_says_its_size_shows_progress_and_loads(
    pack, hf_cache, monkeypatch, tiny, progress_hook, caplog
):
    files = {
        f: (tiny["model"] / f).read_bytes() for f in ("config.json", "tokenizer.json", "model.safetensors")
    }
    hub = FakeHub("qwenclip-test/tiny", files)
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hook = progress_hook(Progress())
        with caplog.at_level("INFO", logger="qwenclip"):
            enc = pack.nodes.QwenEncoderLoader().load(
                "qwen3-tiny", "tiny", "cpu", "f32", hub_id="qwenclip-test/tiny"
            )[0]
        total = sum(len(d) for d in files.values())
        assert f"downloading qwenclip-test/tiny: 3 files, {total / 1e9:.2f} GB" in caplog.text
        assert hub.sent == total
        assert hook.calls and hook.calls[-1][:2] == (1000, 1000), hook.calls[-3:]
        cond = pack.nodes.QwenTextEncodeSDXL().encode(enc, "a lighthouse", 1024, 1024, 0, 0, 1024, 1024)[0]
        assert cond[0][0].shape == (1, 77, 2048)
        # now it is cached: listed as it is, and loaded without the hub
        hub.close()
        again = pack.nodes.QwenEncoderLoader().load(
            "qwen3-tiny", "tiny", "cpu", "f32", hub_id="qwenclip-test/tiny"
        )[0]
        assert again.config["model"] == enc.config["model"]
    finally:
        hub.close()


# -- Vision-based distillation judged by ComfyUI's MODEL -------------------------------------------

VISION = dict(objective="vision", resolution=64, denoise_steps=3, guidance_min=2.0, guidance_max=5.0)


def _sd15_tiny_model(pack):
    """An SD1.5-shaped tiny MODEL (context 768, no ADM), built as the demo builds SDXL's."""
    import comfy.model_patcher
    import comfy.supported_models

    demo = pack.demo
    unet = {
        **demo.TINY_UNET,
        "context_dim": 768,
        "adm_in_channels": None,
        "num_classes": None,
        "use_linear_in_transformer": False,
    }
    cfg = comfy.supported_models.SD15(unet)
    cfg.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(cfg.get_model({}), torch.device("cpu"), torch.device("cpu"))


def _reference_vision_step(model, trajectory, noise, teacher, uncond, student):
    """The judge's step written out in plain torch on the bare UNet module: SDXL's ADM vector,
    the discrete schedule's sigmas by ComfyUI's "simple" rule (every (1000/N)-th training
    sigma from the top), full-denoise noise scaling, eps-prediction, CFG on the noise, Euler."""
    base = model.model
    unet = base.diffusion_model
    table = base.model_sampling.sigmas.float()
    n_steps, size, k = trajectory["denoise_steps"], trajectory["resolution"], trajectory["step"]
    idx = [len(table) - 1 - int(i * len(table) / n_steps) for i in range(n_steps)]
    sigmas = torch.cat([table[idx], torch.zeros(1)])
    n = noise.shape[0]
    sizes = base.embedder(torch.tensor([float(v) for v in (size, size, 0, 0, size, size)]))
    sizes = sizes.flatten()[None].repeat(n, 1)

    def eps(x, sigma, e, p):
        t = (table.log() - sigma.log()).abs().argmin().float().expand(n)
        return unet(x / (sigma**2 + 1) ** 0.5, t, context=e, y=torch.cat([p, sizes], 1)).float()

    g = torch.tensor(trajectory["guidance"]).reshape(-1, 1, 1, 1)
    ue, up = uncond[0].expand(n, -1, -1), uncond[1].expand(n, -1)
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    with torch.no_grad():
        for j in range(k):
            c, u = eps(x, sigmas[j], *teacher), eps(x, sigmas[j], ue, up)
            x = x + (u + g * (c - u)) * (sigmas[j + 1] - sigmas[j])
        want = eps(x, sigmas[k], *teacher)
    e, p = (t.clone().requires_grad_(True) for t in student)
    loss = (eps(x, sigmas[k], e, p) - want).pow(2).flatten(1).mean(1).mean()
    ge, gp = torch.autograd.grad(loss, (e, p))
    return float(loss.detach()), ge, gp


def test_the_comfy_judge_step_equals_a_plain_torch_reference(pack):
    demo = pack.demo
    with torch.inference_mode():  # as ComfyUI builds models while running a graph
        model = demo.tiny_model(5)
    g = torch.Generator().manual_seed(0)
    n = 2
    traj = {"seed": 9, "step": 2, "denoise_steps": 4, "resolution": 64, "guidance": [2.0, 4.5]}
    noise = torch.randn(n, 4, 8, 8, generator=g)
    teacher = (torch.randn(n, 77, 2048, generator=g), torch.randn(n, 1280, generator=g))
    uncond = (torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g))
    student = (torch.randn(n, 77, 2048, generator=g), torch.randn(n, 1280, generator=g))
    with torch.inference_mode(False), torch.enable_grad():
        judge = importlib.import_module(f"{PACKAGE}.vision").ComfyJudge(model, "simple")
        judge.load()
        loss, ge, gp = judge.step(traj, noise, teacher, uncond, student)
        want = _reference_vision_step(model, traj, noise, teacher, uncond, student)
    assert loss > 0 and abs(loss - want[0]) <= 1e-4 * want[0], (loss, want[0])
    for got, ref in ((ge, want[1]), (gp, want[2])):
        scale = ref.abs().max()
        assert scale > 0 and (got - ref).abs().max() <= 1e-4 * scale
    assert judge.latents[:2] == (9, 3), "the latents one step further are kept for the next step"


def test_vision_training_through_the_node_learns_and_resumes_exactly(
    pack, encoder, teacher_clip, progress_hook
):
    import comfy.model_management as mm

    demo = pack.demo
    with torch.inference_mode():
        model = demo.tiny_model(5)
    common = dict(VISION, schedule="constant", warmup_steps=0, grad_accum=1, lr_lora=3e-3, lr_resampler=3e-3)
    progress_hook(Progress())
    with torch.inference_mode():
        _train(pack, encoder, teacher_clip, "unit_vision", steps=9, save_every=100, model=model, **common)
    state, folder = _state(pack, "unit_vision")
    losses = [x for _, x in state["losses"]]
    assert state["step"] == 9 and len(losses) == 9
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_vision" in x for x in lines if "loss" in x)
    # Three trajectories of three denoising steps: the same steps of the first and the last.
    assert sum(losses[6:]) < sum(losses[:3]), losses

    progress_hook(Progress(cancel_at=4))  # in the middle of the second trajectory
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
        _train(pack, encoder, teacher_clip, "unit_vision_cut", steps=9, save_every=100, model=model, **common)
    cut, _ = _state(pack, "unit_vision_cut")
    assert cut["step"] == 4
    progress_hook(Progress())
    with torch.inference_mode():
        _train(pack, encoder, teacher_clip, "unit_vision_cut", steps=9, save_every=100, model=model, **common)
    resumed, _ = _state(pack, "unit_vision_cut")
    assert [s for s, _ in resumed["losses"]] == list(range(1, 10))
    for (s, a), (_, b) in zip(state["losses"], resumed["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {s}: {a} straight, {b} resumed"


def test_vision_needs_an_sdxl_model(pack, encoder, teacher_clip, progress_hook):
    progress_hook(Progress())
    with pytest.raises(ValueError, match="connect the SDXL checkpoint's MODEL"):
        _train(pack, encoder, teacher_clip, "unit_vision_none", steps=1, **VISION)
    with pytest.raises(ValueError, match="needs the MODEL of an SDXL checkpoint.*SD15|BaseModel"):
        _train(
            pack, encoder, teacher_clip, "unit_vision_sd15", steps=1, model=_sd15_tiny_model(pack), **VISION
        )


def _library_judged_losses(pack, encoder, clip, out, settings, judge) -> list[float]:
    """A run the library judges with its own UNet (`judge`, run JSON), answered with the
    CLIP's targets; each optimizer step's loss."""
    lib = pack.library.get()
    base = encoder.base
    spec = {
        "out": str(out),
        "captions": {"paths": [], "text": CAPTIONS},
        "settings": settings,
        "resume": "never",
        "judge": judge,
    }
    with base.lock:
        base.select(None)
        handle = lib.run_open(base.handle, spec)
    teacher = pack.training.Teacher(clip, (77, 2048, 1280))
    losses = []
    try:
        state = lib.run_state(handle)
        while not state["done"]:
            e, p = teacher.batch(state["captions"])
            lib.run_supply(handle, e.data_ptr(), e.numel(), p.data_ptr(), p.numel())
            state = lib.run_state(handle)
            losses += [ev["report"]["loss"] for ev in state["events"] if ev["kind"] == "step"]
    finally:
        lib.run_free(handle)
    return losses


def test_the_comfy_judge_trains_as_the_library_judge_on_the_same_weights(
    pack, encoder, teacher_clip, progress_hook, monkeypatch, tmp_path
):
    """ComfyUI's MODEL as the judge (the node, the host route) and the library's own UNet on
    the same weights (the tiny SDXL saved as a single file) train alike: ComfyUI's
    "simple" scheduler walks diffusers' "trailing" Euler timesteps and sigmas. The one
    convention that differs, the starting noise (KSampler: sqrt(1 + sigma_max^2), diffusers'
    trailing Euler: sigma_max), is aligned here; everything else is the shipped code.

    Every step's loss within 1e-4 relative.
    """
    from safetensors.torch import save_file

    with torch.inference_mode():
        model = pack.demo.tiny_model(5)
    weights = {
        f"model.diffusion_model.{k}": v.clone() for k, v in model.model.diffusion_model.state_dict().items()
    }
    unet_file = tmp_path / "tiny_sdxl.safetensors"
    save_file(weights, str(unet_file))
    vision = importlib.import_module(f"{PACKAGE}.vision")
    monkeypatch.setattr(vision.ComfyJudge, "start", lambda self, noise, sigmas: noise * sigmas[0])

    progress_hook(Progress())
    settings = dict(VISION, denoise_steps=2, grad_accum=1, schedule="constant", warmup_steps=0)
    with torch.inference_mode():
        _train(
            pack,
            encoder,
            teacher_clip,
            "unit_same_judge",
            steps=3,
            model=model,
            scheduler="simple",
            **settings,
        )
    host, _ = _state(pack, "unit_same_judge")
    config = host["trainer"]["config"]
    judge = {"unet": str(unet_file), "config": pack.demo.TINY_UNET_DIFFUSERS, "timestep_spacing": "trailing"}
    library = _library_judged_losses(pack, encoder, teacher_clip, tmp_path / "library_run", config, judge)
    got = [x for _, x in host["losses"]]
    assert len(library) == len(got) == 3
    for a, b in zip(library, got, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), f"library {library} vs ComfyUI {got}"
