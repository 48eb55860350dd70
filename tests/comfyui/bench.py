"""Benchmark (not a test): the node pack's cost over the library.

1. Qwen Text Encode (SDXL), the node function as ComfyUI calls it, against the library's
   encode called directly through ctypes into preallocated buffers, on the same handle,
   interleaved. Run on the tiny model (the Python layer's cost in absolute terms) and on a
   Qwen3-0.6B-shaped model with random weights (a realistic encode; overhead in %).
2. The pack's import time: in a fresh process that has imported what ComfyUI has at that
   point (median of 7), and ComfyUI's own import-time line for the pack at server start-up.

3. With --vision, only the vision step: Qwen Adapter Train's judged step (ComfyUI's MODEL,
   the library's student, the gradient across the boundary) against diffusers + peft doing the
   same step on the same random weights (tests/reference/bench_vision.py's worker, run with
   REFERENCE_PYTHON), at 256 px.

Run: bash .ci/comfyui.sh bench   (or with the variables that script sets: QWENCLIP_COMFYUI,
QWENCLIP_LIB, QWENCLIP_DEV_BIN; run from the repository root). --quick skips the 0.6B model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COMFY = os.environ["QWENCLIP_COMFYUI"]
sys.path.insert(0, COMFY)
sys.path.insert(0, str(HERE))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import torch  # noqa: E402
from conftest import PLUGIN, plugin_package  # noqa: E402

PROMPT = (
    "a photo of a red fox sitting in fresh snow, soft morning light, detailed fur, shallow depth of field"
)


def bench_encode(pack, model_dir: Path, adapter_dir: Path, rounds: int, warmup: int = 3) -> dict:
    import folder_paths

    te = model_dir.parent
    folder_paths.add_model_folder_path("text_encoders", str(te), is_default=True)
    folder_paths.add_model_folder_path("qwenclip", str(adapter_dir.parent), is_default=True)
    lib = pack.library.get()
    t0 = time.perf_counter()
    enc = pack.nodes.QwenEncoderLoader().load(model_dir.name, adapter_dir.name, "cpu", "f32")[0]
    load_s = time.perf_counter() - t0
    node = pack.nodes.QwenTextEncodeSDXL()
    s, e, p = enc.shape()
    cond = torch.empty((1, s, e))
    pooled = torch.empty((1, p))
    handle = enc.base.handle

    def direct():
        lib.encode_into(handle, [PROMPT], cond.data_ptr(), cond.numel(), pooled.data_ptr(), pooled.numel())

    def via_node():
        node.encode(enc, PROMPT, 1024, 1024, 0, 0, 1024, 1024)

    torch.set_grad_enabled(False)
    for _ in range(warmup):
        direct()
        via_node()
    d, n = [], []
    for _ in range(rounds):
        for f, acc in ((direct, d), (via_node, n)):
            t = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t)
    out = node.encode(enc, PROMPT, 1024, 1024, 0, 0, 1024, 1024)[0]
    direct()
    assert torch.equal(out[0][0], cond), "node and library agree"
    md, mn = statistics.median(d), statistics.median(n)
    paired = statistics.median(b - a for a, b in zip(d, n, strict=True))  # drift-free: each pair back to back
    return {
        "model": model_dir.name,
        "load_s": round(load_s, 3),
        "rounds": rounds,
        "direct_ms_median": round(md * 1e3, 3),
        "node_ms_median": round(mn * 1e3, 3),
        "direct_ms_mean": round(statistics.mean(d) * 1e3, 3),
        "node_ms_mean": round(statistics.mean(n) * 1e3, 3),
        "overhead_ms_median": round((mn - md) * 1e3, 3),
        "overhead_pct_median": round((mn - md) / md * 100, 2),
        "overhead_ms_paired_median": round(paired * 1e3, 3),
        "overhead_pct_paired": round(paired / md * 100, 2),
    }


def import_time_fresh(repeats: int = 7) -> dict:
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {COMFY!r})
        import comfy.cli_args; comfy.cli_args.args.cpu = True
        import torch, folder_paths, comfy.model_management, comfy.utils, comfy.sd, nodes
        import importlib.util
        t = time.perf_counter()
        spec = importlib.util.spec_from_file_location('comfyui_qwenclip', {str(PLUGIN / "__init__.py")!r},
                                                      submodule_search_locations=[{str(PLUGIN)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules['comfyui_qwenclip'] = m; spec.loader.exec_module(m)
        print(time.perf_counter() - t)
    """)
    times = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(r.stdout.split()[-1]))
    return {
        "repeats": repeats,
        "median_ms": round(statistics.median(times) * 1e3, 2),
        "max_ms": round(max(times) * 1e3, 2),
    }


def import_time_server() -> dict:
    from comfy_server import ComfyServer

    with tempfile.TemporaryDirectory() as d:
        s = ComfyServer(Path(d))
        s.prepare()
        try:
            s.start()
            log = s.log()
        finally:
            s.stop()
    m = re.search(r"^\s*([\d.]+) seconds: .*comfyui-qwenclip\s*$", log, re.M)
    return {"comfyui_reported_s": float(m.group(1)) if m else None, "server_ready_s": round(s.startup_s, 1)}


def adapter_for(pack, model_dir: Path, out: Path) -> Path:
    """An untrained adapter bundle for `model_dir` (LoRA + a default-size resampler): a
    training run saved before its first step, `out/adapter`. What a trained adapter costs."""
    if (out / "adapter" / "qwenclip.json").is_file():
        return out / "adapter"
    lib = pack.library.get()
    h = lib.encoder_load({"model": str(model_dir)})
    run = lib.run_open(h, {"out": str(out), "captions": {"text": "a"}, "settings": {"held_out": 0.0}})
    lib.run_save(run)
    lib.run_free(run)
    lib.encoder_free(h)
    return out / "adapter"


class FixedTeacher:
    """Stands in for the checkpoint's CLIP: fixed random targets (the reference uses random
    ones too), so the step timed is the judge's and the student's."""

    seq, embed, pooled = 77, 2048, 1280

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.e = torch.randn(1, self.seq, self.embed, generator=g)
        self.p = torch.randn(1, self.pooled, generator=g)

    def targets(self, caption):
        return self.e[0], self.p[0]

    def batch(self, captions):
        n = len(captions)
        return self.e.expand(n, -1, -1).contiguous(), self.p.expand(n, -1).contiguous()


def bench_vision(pack, model_dir: Path, model, work: Path, reps: int, resolution: int) -> dict:
    """The node's vision step (Qwen Adapter Train's judged step: the library's noise and
    student conditioning out, ComfyUI's MODEL walks the step, the gradient back) with the
    student in `model_dir`; the step sizes of tests/reference/bench_vision.py (batch 1, 77
    tokens, LoRA r16, resampler 1024/16)."""
    import shutil

    import comfy.model_management

    vision = __import__(f"{pack.__name__}.vision", fromlist=["ComfyJudge"])
    judge = vision.ComfyJudge(model, "normal")
    qwenclip = pack.library.package()
    encoder = qwenclip.Encoder(model_dir)
    out = work / "vision-run"
    shutil.rmtree(out, ignore_errors=True)
    settings = {
        "objective": "vision",
        "steps": reps + 1,
        "batch_size": 1,
        "held_out": 0.0,
        "eval_every": 0,
        "save_every": 0,
        "lora_r": 16,
        "lora_alpha": 16.0,
        "resampler_width": 1024,
        "resampler_heads": 16,
        "vision": {"resolution": resolution, "denoise_steps": 20},
    }
    caption = "a" + " a" * 76  # 77 Qwen tokens, as bench-train's prompts
    spec = {"out": str(out), "captions": {"text": caption}, "settings": settings, "judge": "host"}
    teacher = FixedTeacher()
    with torch.inference_mode(False), torch.enable_grad(), qwenclip.TrainingRun(encoder, spec) as run:
        judge.load()
        times = []
        state = run.state()
        while not state["done"]:
            assert state["need"] == "train", state["need"]
            t = time.perf_counter()
            pack.training._judged_step(run, state, teacher, judge)
            times.append(time.perf_counter() - t)
            state = run.state()
    encoder.close()
    del judge  # the reference runs next, in its own process: give the memory back
    comfy.model_management.unload_all_models()
    gc.collect()
    timed = sorted(times[1:])
    return {"impl": "comfyui+qwenclip", "resolution": resolution, "median_step_s": timed[len(timed) // 2]}


def vision_pair(pack, name: str, work: Path, reps: int) -> tuple[dict, dict]:
    """ComfyUI's judged step and the reference on the same UNet weights at 256 px: `tiny` (the
    pack's tiny SDXL, also written as a single file for diffusers, with the tiny Qwen3
    student; 10x the reps) or `sdxl` (the random SDXL-shaped UNet bench_vision.py wrote, with
    the Qwen3-0.6B student)."""
    import comfy.sd

    if name == "tiny":
        from safetensors.torch import save_file

        model_dir = work / "tiny" / "model"
        if not (model_dir / "config.json").is_file():
            subprocess.run([os.environ["QWENCLIP_DEV_BIN"], "tiny", "--out", str(work / "tiny")], check=True)
        model = pack.demo.tiny_model(5)
        sd = model.model.diffusion_model.state_dict()
        unet_file = work / "tiny-sdxl-unet.safetensors"
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, str(unet_file))
        config = work / "tiny-sdxl-unet.json"
        config.write_text(json.dumps(pack.demo.TINY_UNET_DIFFUSERS))
        unet, n = ["--unet-file", str(unet_file), "--unet-config", str(config)], reps * 10
    else:
        model_dir, unet_dir = work / "qwen3-0.6b", work / "sdxl-unet"
        model = comfy.sd.load_diffusion_model(
            str(unet_dir / "diffusion_pytorch_model.safetensors"), model_options={"dtype": torch.float32}
        )
        unet, n = ["--unet-dir", str(unet_dir)], reps
    ours = bench_vision(pack, model_dir, model, work, n, 256)
    del model
    gc.collect()
    return ours, reference_vision(model_dir, unet, n, 256)


def reference_vision(model_dir: Path, unet: list[str], reps: int, resolution: int) -> dict:
    """tests/reference/bench_vision.py's diffusers + peft worker on the same weights (`unet`:
    its --unet-dir, or --unet-file and --unet-config), in its own process (REFERENCE_PYTHON:
    a Python with diffusers, transformers and peft)."""
    cmd = [
        os.environ["REFERENCE_PYTHON"],
        str(ROOT / "tests" / "reference" / "bench_vision.py"),
        "--_torch-worker",
        "--model-dir",
        str(model_dir),
        *unet,
        "--resolution",
        str(resolution),
        "--batch",
        "1",
        "--tokens",
        "77",
        "--reps",
        str(reps),
        "--denoise-steps",
        "20",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qwenclip-bench")
    ap.add_argument(
        "--vision",
        action="store_true",
        help="only the vision step: ComfyUI's judged step vs diffusers + peft at 256 px on the "
        "tiny SDXL and on an SDXL-shaped random UNet (WORK/sdxl-unet, WORK/qwen3-0.6b: "
        "tests/reference/bench_vision.py writes them); needs REFERENCE_PYTHON",
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rows", default="tiny,sdxl", help="with --vision: which rows (tiny, sdxl)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    pack = plugin_package()
    results = {"library": str(pack.library.get().path), "threads": torch.get_num_threads()}
    if a.vision:
        rows = []
        for name in a.rows.split(","):
            ours, ref = vision_pair(pack, name, a.work, a.reps)
            print(json.dumps(ours), json.dumps(ref), flush=True)
            rows.append((name, ours["median_step_s"], ref["median_step_s"]))
        core = os.environ.get("OPENBLAS_CORETYPE")
        blas = f"OPENBLAS_CORETYPE={core}" if core else "OpenBLAS picks its kernels"
        print(f"vision step at 256 px, batch 1, f32, {os.cpu_count()} cores, {blas}:")
        for name, o, r in rows:
            print(f"  {name:5s} ComfyUI + qwenclip {o:8.3f} s   diffusers + peft {r:8.3f} s   {o / r:.2f}x")
        print("target: < 1.10x")
        return

    tiny = a.work / "tiny"
    if not (tiny / "adapter" / "qwenclip.json").is_file():
        subprocess.run(
            [os.environ["QWENCLIP_DEV_BIN"], "tiny", "--out", str(tiny)],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
    results["encode_tiny"] = bench_encode(pack, tiny / "model", tiny / "adapter", a.rounds * 5)
    print(json.dumps(results["encode_tiny"]), flush=True)

    if not a.quick:
        big = a.work / "qwen3-0.6b" / "qwen3-0.6b"
        if not (big / "config.json").is_file():
            subprocess.run(
                [os.environ["QWENCLIP_DEV_BIN"], "random-model", "--shape", "qwen3-0.6b", "--out", str(big)],
                check=True,
                cwd=ROOT,
                capture_output=True,
            )
        adapter = adapter_for(pack, big, a.work / "adapters" / "qwen3-0.6b-untrained")
        results["encode_qwen3_0.6b"] = bench_encode(pack, big, adapter, max(5, a.rounds // 3))
        print(json.dumps(results["encode_qwen3_0.6b"]), flush=True)

    results["import_fresh_process"] = import_time_fresh()
    print(json.dumps(results["import_fresh_process"]), flush=True)
    results["import_comfyui_startup"] = import_time_server()
    print(json.dumps(results["import_comfyui_startup"]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
