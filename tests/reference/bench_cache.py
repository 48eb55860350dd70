"""CPU cache-targets throughput (captions/s) of qwenclip against `transformers` CLIP, same weights.

What is measured
  Stage 1 of distillation: captions -> SDXL teacher (CLIP-L + CLIP-G) -> prompt_embeds
  [N,77,2048] (CLIP-L hidden_states[-2] ++ CLIP-G hidden_states[-2]) and pooled [N,1280]
  (CLIP-G text_embeds), in batches of `--batch-size`, on a teacher of SDXL's real size with
  random f32 weights.

How
  1. A random SDXL teacher in the diffusers layout is written once into WORKDIR/sdxl-random
     (reused when it is complete): `transformers.CLIPTextModel` with SDXL's CLIP-L config
     (hidden 768, 12 layers, 12 heads, ffn 3072, quick_gelu, projection 768) in
     `text_encoder/` and `transformers.CLIPTextModelWithProjection` with SDXL's CLIP-G config
     (hidden 1280, 32 layers, 20 heads, ffn 5120, gelu, projection 1280) in
     `text_encoder_2/`, both vocab 49408, 77 positions, layer_norm_eps 1e-5, bos 0 / eos 2 /
     pad 1 as stabilityai/stable-diffusion-xl-base-1.0 ships them (so transformers pools at
     argmax(ids), the end token), saved with `save_pretrained` (safetensors, f32);
     assets/clip_tokenizer.json is copied to `tokenizer/tokenizer.json` and
     `tokenizer_2/tokenizer.json`. `--captions N` synthetic captions go to a text file.
  2. Ours: `qwenclip cache-targets --teacher DIR --captions FILE --out OUT --batch-size B`,
     timed from outside as wall time of the whole process (OUT is deleted first, so nothing is
     resumed): start, teacher load, tokenizing, encoding, writing the shards. Its peak RSS comes
     from `os.wait4`. To separate the fixed cost (start + load + write) from the per-caption
     cost, ours also runs on the first B captions only (before the full run): steady-state
     captions/s = (N - B) / (wall_N - wall_B). Before every timed run the teacher's files are
     read once, so each side starts from a warm page cache (both memory-map or read them).
  3. Reference, in a separate Python process (its own `getrusage` peak RSS): `import torch,
     transformers`, `from_pretrained(..., dtype=torch.float32)` for both encoders (default
     attention: sdpa), `.eval()`, `torch.inference_mode()`, `torch.set_num_threads(cpu_count)`;
     tokenizing with `tokenizers.Tokenizer.from_file(tokenizer/tokenizer.json)` (no special
     tokens) + SDXL's framing by hand: [49406] + content[:75] + [49407], padded to 77 with
     49407 (CLIP-L) or 0 (CLIP-G); `text_encoder(ids, output_hidden_states=True)
     .hidden_states[-2]`, `text_encoder_2(ids, output_hidden_states=True)` -> hidden_states[-2]
     and text_embeds, concatenated like SDXL, batches of B; the outputs are written with
     `safetensors.torch.save_file` (ours writes its cache too). Reported: whole-process wall
     (what ours is timed by), and inside it load / tokenize / encode / save times; steady-state
     captions/s = N / encode time.
  4. Both outputs are compared (max |ours - reference|), so both sides provably did the same
     work on the same ids. Table with the ratios; `--json` writes the combined report.
  The two sides run one after the other, never concurrently. With `--wait-load X` the script
  waits (up to `--wait-max` s) before each side until the 1-minute load average is below X.

Target
  ours/hf captions/s >= 1.0 (read from the table; not a test). A `target/debug` binary has the
  crate at opt-level 1 and dependencies at opt-level 3; a release build is the fair comparison.

Usage
  python tests/reference/bench_cache.py [--qwenclip BIN] [--workdir DIR] [--captions 64]
      [--batch-size 16] [--wait-load 1.5] [--wait-max 600] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DEFAULT_WORKDIR, REPO, add_binary_option, add_wait_options, cpu_label, ensure_written,
    last_json_line, loadavg_line, machine_info, peak_rss_bytes, ratio, render, resolve_binary,
    wait_for_load, write_json,
)

CLIP_TOKENIZER = REPO / "assets" / "clip_tokenizer.json"
SEQ = 77
BOS_ID, EOS_ID, G_PAD_ID = 49406, 49407, 0
MAX_CONTENT = SEQ - 2

# SDXL's configs (stabilityai/stable-diffusion-xl-base-1.0 text_encoder/, text_encoder_2/).
COMMON = dict(vocab_size=49408, max_position_embeddings=SEQ, layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, attention_dropout=0.0, dropout=0.0,
              initializer_factor=1.0, initializer_range=0.02)
L_CFG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             hidden_act="quick_gelu", projection_dim=768, **COMMON)
G_CFG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             hidden_act="gelu", projection_dim=1280, **COMMON)
TEACHER_FILES = ("text_encoder/config.json", "text_encoder/model.safetensors",
                 "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
                 "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json")


# --------------------------------------------------------------------------------------------
# Inputs: the random teacher and the captions.
# --------------------------------------------------------------------------------------------


def write_teacher(out: Path) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    for sub, cls, cfg in (("text_encoder", CLIPTextModel, L_CFG),
                          ("text_encoder_2", CLIPTextModelWithProjection, G_CFG)):
        config = CLIPTextConfig(**cfg)
        config.architectures = [cls.__name__]
        model = cls(config).eval()
        model.save_pretrained(out / sub, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"teacher: {sub}: {cls.__name__}, {n / 1e6:.1f}M parameters", file=sys.stderr)
        del model
    for sub in ("tokenizer", "tokenizer_2"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CLIP_TOKENIZER, out / sub / "tokenizer.json")


def ensure_teacher(workdir: Path) -> Path:
    """WORKDIR/sdxl-random, written once (into WORKDIR/.sdxl-random.partial, then renamed)."""
    # In a child process, so the parent stays small and holds no torch threads.
    return ensure_written(
        workdir, "sdxl-random", TEACHER_FILES, "teacher", "a random SDXL teacher (CLIP-L + CLIP-G, f32)",
        lambda tmp: [sys.executable, str(Path(__file__).resolve()), "--_write-teacher", str(tmp)],
    )


SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "two astronauts", "a tabby cat",
            "a steam locomotive", "a medieval castle", "a glass teapot", "a surfer", "a violin",
            "a snowy mountain village", "a robot gardener", "a hot air balloon", "a koi pond",
            "a vintage typewriter", "a city street at night"]
DETAILS = ["in the rain", "at golden hour", "under a starry sky", "on a wooden table",
           "surrounded by wildflowers", "in a foggy forest", "reflected in a puddle",
           "with dramatic lighting", "seen from above", "in the middle of a desert"]
STYLES = ["oil painting", "35mm photograph", "watercolor", "isometric 3d render",
          "charcoal sketch", "studio photo, soft light", "anime illustration", "macro shot"]
EXTRAS = ["highly detailed", "sharp focus", "8k", "muted colors", "vibrant colors",
          "cinematic composition", "depth of field", "trending on artstation", "film grain"]


def write_captions(path: Path, n: int, seed: int = 0) -> list[str]:
    """`n` distinct synthetic captions, 8 to ~45 CLIP tokens each, one per line."""
    rng = random.Random(seed)
    caps, seen = [], set()
    while len(caps) < n:
        c = f"{rng.choice(SUBJECTS)} {rng.choice(DETAILS)}, {rng.choice(STYLES)}"
        extra = rng.sample(EXTRAS, rng.randint(0, 5))
        if extra:
            c += ", " + ", ".join(extra)
        if c not in seen:
            seen.add(c)
            caps.append(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(caps) + "\n")
    return caps


# --------------------------------------------------------------------------------------------
# The transformers side (runs in its own process: `--_torch-worker`).
# --------------------------------------------------------------------------------------------


def torch_worker(teacher: Path, captions_file: Path, batch_size: int, out_file: Path) -> None:
    t_start = time.perf_counter()
    import safetensors.torch
    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    import_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    te1 = transformers.CLIPTextModel.from_pretrained(teacher / "text_encoder", dtype=torch.float32).eval()
    te2 = transformers.CLIPTextModelWithProjection.from_pretrained(
        teacher / "text_encoder_2", dtype=torch.float32).eval()
    tok_l = tokenizers.Tokenizer.from_file(str(teacher / "tokenizer" / "tokenizer.json"))
    tok_g = tokenizers.Tokenizer.from_file(str(teacher / "tokenizer_2" / "tokenizer.json"))
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    captions = [l.strip() for l in captions_file.read_text().splitlines() if l.strip()]

    def sdxl_ids(tok: tokenizers.Tokenizer, pad: int) -> torch.Tensor:
        rows = []
        for enc in tok.encode_batch(captions, add_special_tokens=False):
            ids = [BOS_ID] + enc.ids[:MAX_CONTENT] + [EOS_ID]
            rows.append(ids + [pad] * (SEQ - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    ids_l, ids_g = sdxl_ids(tok_l, EOS_ID), sdxl_ids(tok_g, G_PAD_ID)
    tokenize_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    embeds, pooled = [], []
    with torch.inference_mode():
        for i in range(0, len(captions), batch_size):
            l = te1(ids_l[i:i + batch_size], output_hidden_states=True)
            g = te2(ids_g[i:i + batch_size], output_hidden_states=True)
            embeds.append(torch.cat([l.hidden_states[-2], g.hidden_states[-2]], dim=-1))
            pooled.append(g.text_embeds)
            del l, g
    embeds, pooled = torch.cat(embeds), torch.cat(pooled)
    encode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    safetensors.torch.save_file({"prompt_embeds": embeds.contiguous(), "pooled": pooled.contiguous(),
                                 "ids_l": ids_l.to(torch.int32), "ids_g": ids_g.to(torch.int32)},
                                str(out_file))
    save_s = time.perf_counter() - t0

    report = {
        "impl": "transformers", "captions": len(captions), "batch_size": batch_size,
        "import_s": import_s, "load_s": load_s, "tokenize_s": tokenize_s, "encode_s": encode_s,
        "save_s": save_s, "inside_s": time.perf_counter() - t_start,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": te2.config._attn_implementation,
    }
    print(json.dumps(report))


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def run_timed(cmd: list[str]) -> tuple[float, int, str]:
    """Runs `cmd`; returns (wall seconds, peak RSS bytes of that process, stdout)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        s = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - s
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, text)
    return wall, usage.ru_maxrss * 1024, text


def warm_page_cache(teacher: Path) -> float:
    """Reads every teacher file once, so neither side pays for the disk: both memory-map or
    read the weights, and whichever ran first would otherwise get the cold page cache."""
    s = time.perf_counter()
    for f in sorted(teacher.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - s


def run_ours(binary: Path, teacher: Path, captions: Path, out: Path, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(binary), "cache-targets", "--teacher", str(teacher), "--captions", str(captions),
           "--out", str(out), "--batch-size", str(batch_size)]
    print("ours: " + " ".join(cmd), file=sys.stderr)
    wall, rss, stdout = run_timed(cmd)
    print(stdout.strip(), file=sys.stderr)
    return {"impl": "qwenclip", "wall_s": wall, "peak_rss_bytes": rss, "out": str(out)}


def read_ours(out: Path):
    """Ours' cache as (prompt_embeds, pooled) tensors in caption order."""
    import safetensors.torch
    import torch

    manifest = json.loads((out / "manifest.json").read_text())
    shards = sorted(out.glob("shard-*.safetensors"))
    parts = [safetensors.torch.load_file(str(s)) for s in shards]
    index = torch.cat([p["index"].long() for p in parts])
    embeds = torch.cat([p["prompt_embeds"].float() for p in parts])
    pooled = torch.cat([p["pooled"].float() for p in parts])
    order = torch.argsort(index)
    return embeds[order], pooled[order], manifest


def compare(ours_out: Path, ref_file: Path) -> dict:
    import safetensors.torch

    e, p, _ = read_ours(ours_out)
    ref = safetensors.torch.load_file(str(ref_file))
    re_, rp = ref["prompt_embeds"], ref["pooled"]
    if e.shape != re_.shape or p.shape != rp.shape:
        return {"shapes_match": False, "ours": [list(e.shape), list(p.shape)],
                "hf": [list(re_.shape), list(rp.shape)]}
    return {"shapes_match": True,
            "max_abs_embeds": (e - re_).abs().max().item(), "max_abs_pooled": (p - rp).abs().max().item(),
            "max_ref_embeds": re_.abs().max().item(), "max_ref_pooled": rp.abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_binary_option(p)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="where the random teacher is written once and reused")
    p.add_argument("--captions", type=int, default=64, help="number of synthetic captions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-split", action="store_true",
                   help="skip ours' second run on --batch-size captions (no steady-state estimate)")
    add_wait_options(p)
    p.add_argument("--json", type=Path, default=None, help="write the combined report here")
    p.add_argument("--_torch-worker", dest="torch_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_write-teacher", dest="write_teacher", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--captions-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ref-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.write_teacher:
        write_teacher(args.write_teacher)
        return
    if args.torch_worker:
        torch_worker(args.teacher_dir, args.captions_file, args.batch_size, args.ref_out)
        return
    if args.captions < 1 or args.batch_size < 1:
        p.error("--captions and --batch-size must be >= 1")

    binary = resolve_binary(p, args.qwenclip)
    teacher = ensure_teacher(args.workdir)
    run_dir = args.workdir / "cache-bench"
    run_dir.mkdir(parents=True, exist_ok=True)
    n, bs = args.captions, args.batch_size
    caps_file = run_dir / f"captions-{n}.txt"
    caps = write_captions(caps_file, n)
    split = not args.no_split and n > bs
    if split:
        small_file = run_dir / f"captions-{bs}.txt"
        small_file.write_text("\n".join(caps[:bs]) + "\n")

    load = {}
    load["ours"] = wait_for_load(args.wait_load, args.wait_max, "ours")
    warm_page_cache(teacher)
    if split:  # the small run first; the full run right after it is the one compared
        small = run_ours(binary, teacher, small_file, run_dir / "out-ours-small", bs)
        shutil.rmtree(run_dir / "out-ours-small", ignore_errors=True)
        warm_page_cache(teacher)
    ours = run_ours(binary, teacher, caps_file, run_dir / "out-ours", bs)
    if split:
        ours["small_captions"] = bs
        ours["small_wall_s"] = small["wall_s"]
    load["ours"]["load_after"] = os.getloadavg()[0]
    print(json.dumps(ours), file=sys.stderr)

    load["hf"] = wait_for_load(args.wait_load, args.wait_max, "transformers")
    warm_page_cache(teacher)
    ref_file = run_dir / "out-hf.safetensors"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_torch-worker", "--teacher-dir", str(teacher),
           "--captions-file", str(caps_file), "--batch-size", str(bs), "--ref-out", str(ref_file)]
    print("transformers: " + " ".join(cmd), file=sys.stderr)
    wall, _, stdout = run_timed(cmd)
    theirs = last_json_line(stdout, "the transformers worker")
    theirs["wall_s"] = wall
    load["hf"]["load_after"] = os.getloadavg()[0]
    print(json.dumps(theirs), file=sys.stderr)

    check = compare(run_dir / "out-ours", ref_file)
    ref_file.unlink(missing_ok=True)

    # ---- table
    gib = 1024**3
    o_e2e, h_e2e = n / ours["wall_s"], n / theirs["wall_s"]
    rows = [("captions/s, whole process", f"{o_e2e:.2f}", f"{h_e2e:.2f}", ratio(o_e2e, h_e2e), True)]
    summary = {"captions": n, "batch_size": bs, "e2e_captions_per_s": {"ours": o_e2e, "hf": h_e2e,
                                                                       "ratio": ratio(o_e2e, h_e2e)}}
    if split:
        o_ss = (n - bs) / max(ours["wall_s"] - ours["small_wall_s"], 1e-9)
        h_ss = n / theirs["encode_s"]
        rows.append(("captions/s, steady state (*)", f"{o_ss:.2f}", f"{h_ss:.2f}", ratio(o_ss, h_ss), True))
        o_fixed = ours["small_wall_s"] - bs / o_ss
        h_fixed = theirs["wall_s"] - theirs["encode_s"]
        rows.append(("fixed cost s (start+load+write)", f"{o_fixed:.2f}", f"{h_fixed:.2f}",
                     ratio(o_fixed, h_fixed), False))
        if o_fixed < 0 or o_ss <= 0:
            summary["split_note"] = "ours' two runs disagree (load changed between them): ignore the split"

        summary["steady_captions_per_s"] = {"ours": o_ss, "hf": h_ss, "ratio": ratio(o_ss, h_ss)}
        summary["fixed_s"] = {"ours": o_fixed, "hf": h_fixed}
    rows.append((f"wall s, {n} captions", f"{ours['wall_s']:.2f}", f"{theirs['wall_s']:.2f}",
                 ratio(ours["wall_s"], theirs["wall_s"]), False))
    rows.append(("peak RSS GiB", f"{ours['peak_rss_bytes'] / gib:.2f}",
                 f"{theirs['peak_rss_bytes'] / gib:.2f}",
                 ratio(ours["peak_rss_bytes"], theirs["peak_rss_bytes"]), False))
    summary["ratio_peak_rss"] = rows[-1][3]
    header = ("", "ours", "hf", "ours/hf")
    lines = [(r[0], r[1], r[2], f"{r[3]:.2f}" + ((" (slower)" if r[3] < 1.0 else "") if r[4] else ""))
             for r in rows]
    print(f"\ncache-targets, random SDXL teacher (CLIP-L 12x768 + CLIP-G 32x1280, f32), {n} captions, "
          f"batch {bs}, {cpu_label()}, binary {binary}")
    for l in render(header, lines, first_left=True):
        print(l)
    if summary.get("split_note"):
        print(f"NOTE: {summary['split_note']}")
    if split:
        print(f"(*) ours: ({n} - {bs}) / (wall {n} captions {ours['wall_s']:.2f} s - wall {bs} captions "
              f"{ours['small_wall_s']:.2f} s); hf: {n} / encode time {theirs['encode_s']:.2f} s")
    print(f"hf inside its process: import {theirs['import_s']:.2f} s, load {theirs['load_s']:.2f} s, "
          f"tokenize {theirs['tokenize_s']:.3f} s, encode {theirs['encode_s']:.2f} s, save {theirs['save_s']:.2f} s"
          f"   (torch {theirs['torch']}, transformers {theirs['transformers']}, "
          f"attn {theirs['attn_implementation']}, threads {theirs['threads']})")
    if check.get("shapes_match"):
        print(f"same outputs: max |ours - hf| prompt_embeds {check['max_abs_embeds']:.2e} "
              f"(max |hf| {check['max_ref_embeds']:.2f}), pooled {check['max_abs_pooled']:.2e} "
              f"(max |hf| {check['max_ref_pooled']:.2f})")
    else:
        print(f"OUTPUT SHAPES DIFFER: {check}")
    print(loadavg_line("loadavg ", load))
    print("\ntarget: ours/hf captions/s >= 1.0 (read from this table; not a test)")

    if args.json:
        combined = {"teacher": str(teacher), "binary": str(binary), "captions_file": str(caps_file),
                    "machine": machine_info(),
                    "qwenclip": ours, "transformers": theirs, "outputs": check, "comparison": summary,
                    "loadavg_1min": load}
        write_json(args.json, combined)


if __name__ == "__main__":
    main()
