"""Writes the example workflows in workflows/: each as a UI-format file (what people share and
drag into ComfyUI) and its API-format twin (what /prompt and scripts take), from one
description here. Edit this file and run it (`python tests/comfyui/make_workflows.py`)
rather than editing the JSON by hand; the browser test checks that the frontend turns each UI
file into exactly its API twin.

Widget order per node is the frontend's (required inputs then optional ones, a
`control_after_generate` value after seeds that have one)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "workflows"

CKPT = "sd_xl_base_1.0.safetensors"
BASE = "Qwen/Qwen3-4B"
ADAPTER = "my_adapter"
PROMPT = (
    "a photo of a red fox sitting in fresh snow, soft morning light, detailed fur, shallow depth of field"
)
NEGATIVE = "blurry, low quality, watermark"
CAPTIONS = "\n".join(
    [
        "a photo of a red fox sitting in fresh snow, soft morning light",
        "an oil painting of a lighthouse on a cliff at sunset",
        "a bowl of ramen on a wooden table, top view, food photography",
        "portrait of an old fisherman with a grey beard, dramatic lighting",
        "a red cube to the left of a blue sphere on a white floor, 3d render",
        "a cozy reading nook with a window, rain outside, warm lamp light",
        "a watercolor of cherry blossoms over a river in spring",
        "a futuristic city street at night, neon signs, wet asphalt",
    ]
)


def train_defaults() -> dict:
    """The library's training defaults (the node's widget defaults), read through the
    installed qwenclip package."""
    import qwenclip

    return qwenclip.train_defaults()


# The window a workflow is made to open readable in, and what the frontend covers of it
# (left side bar, top banner and tabs, right margin, bottom zoom controls), in pixels.
VIEW_SIZE = (1600, 1000)
VIEW_CLEAR = (70, 100, 30, 70)
TITLE_HEIGHT = 30


def size_widgets(side: int) -> list:
    """SDXL's size conditioning of a square picture."""
    return [("width", side), ("height", side), ("crop_w", 0), ("crop_h", 0)] + [
        ("target_width", side),
        ("target_height", side),
    ]


SIZE_64 = size_widgets(64)
SIZE_1024 = size_widgets(1024)

OUTPUT_TYPES = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "QwenDemoTinySDXL": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "LoraLoader": [("MODEL", "MODEL"), ("CLIP", "CLIP")],
    "QwenEncoderLoader": [("encoder", "QWEN_ENCODER")],
    "QwenAdapterSelect": [("encoder", "QWEN_ENCODER")],
    "QwenTextEncodeSDXL": [("CONDITIONING", "CONDITIONING")],
    "CLIPTextEncodeSDXL": [("CONDITIONING", "CONDITIONING")],
    "QwenAdapterTrain": [("encoder", "QWEN_ENCODER"), ("loss_curve", "IMAGE")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
    "Note": [],
}


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_, pos, size, widgets=(), inputs=(), title=None, api=True, color=None):
        """widgets: [(name, value)]; inputs: [(name, type, (node, slot))]."""
        nid = len(self.nodes) + 1
        n = {
            "id": nid,
            "type": type_,
            "pos": list(pos),
            "size": list(size),
            "widgets": list(widgets),
            "inputs": list(inputs),
            "title": title,
            "api": api,
            "color": color,
        }
        self.nodes.append(n)
        return nid

    def ui(self) -> dict:
        links = []
        out_links: dict[tuple[int, int], list[int]] = {}
        ui_nodes = []
        for n in self.nodes:
            inputs = []
            for slot, (name, typ, (src, src_slot)) in enumerate(n["inputs"]):
                lid = len(links) + 1
                links.append([lid, src, src_slot, n["id"], slot, typ])
                out_links.setdefault((src, src_slot), []).append(lid)
                inputs.append({"name": name, "type": typ, "link": lid})
            n["_inputs"] = inputs
        for order, n in enumerate(self.nodes):
            outputs = [
                {"name": name, "type": typ, "links": out_links.get((n["id"], i), []), "slot_index": i}
                for i, (name, typ) in enumerate(OUTPUT_TYPES[n["type"]])
            ]
            u = {
                "id": n["id"],
                "type": n["type"],
                "pos": n["pos"],
                "size": n["size"],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": n["_inputs"],
                "outputs": outputs,
                "properties": {"Node name for S&R": n["type"]},
                "widgets_values": [v for _, v in n["widgets"]],
            }
            if n["title"]:
                u["title"] = n["title"]
            if n["color"]:
                u["color"], u["bgcolor"] = n["color"]
            ui_nodes.append(u)
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(links),
            "nodes": ui_nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": self.view()},
            "version": 0.4,
        }

    def view(self) -> dict:
        """The canvas offset and scale that show every node on a 1600x1000 window, clear of
        the frontend's side bar, top bars and zoom controls (the browser test checks it)."""
        x0 = min(n["pos"][0] for n in self.nodes)
        y0 = min(n["pos"][1] for n in self.nodes) - TITLE_HEIGHT
        x1 = max(n["pos"][0] + n["size"][0] for n in self.nodes)
        y1 = max(n["pos"][1] + n["size"][1] for n in self.nodes)
        left, top, right, bottom = VIEW_CLEAR
        width, height = VIEW_SIZE[0] - left - right, VIEW_SIZE[1] - top - bottom
        scale = round(min(1.0, width / (x1 - x0), height / (y1 - y0)), 3)
        # centred in the clear area, in canvas units
        ox = (left + (width - (x1 - x0) * scale) / 2) / scale - x0
        oy = (top + (height - (y1 - y0) * scale) / 2) / scale - y0
        return {"scale": scale, "offset": [round(ox, 1), round(oy, 1)]}

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            if not n["api"]:
                continue
            inputs = {name: v for name, v in n["widgets"] if name != "control_after_generate"}
            for name, _typ, (src, slot) in n["inputs"]:
                inputs[name] = [str(src), slot]
            entry = {"inputs": inputs, "class_type": n["type"]}
            if n["title"]:
                entry["_meta"] = {"title": n["title"]}
            out[str(n["id"])] = entry
        return out


NOTE_COLOR = ("#432", "#653")


def note(g: Graph, text: str, pos=(-480, 0), size=(440, 520)):
    g.node("Note", pos, size, [("text", text.strip() + "\n")], api=False, color=NOTE_COLOR)


def loader(g, pos, adapter=ADAPTER, base=BASE, device="auto", dtype="auto"):
    return g.node(
        "QwenEncoderLoader",
        pos,
        (320, 180),
        [
            ("base_model", base),
            ("adapter", adapter),
            ("device", device),
            ("dtype", dtype),
            ("hub_id", ""),
            ("max_tokens", 0),
        ],
    )


QWEN_SIZE = (400, 400)


def qwen_widgets(text, sizes, clip_text=""):
    """Qwen Text Encode (SDXL)'s widgets: text, the size conditioning, then the optional ones."""
    return [
        ("text", text),
        *sizes,
        ("prompt_syntax", "comfy"),
        ("clip_text", clip_text),
        ("clip_strength", 1.0),
        ("clip_pooled_blend", 0.0),
    ]


def qwen_encode(g, pos, encoder, text, title, clip=None, clip_text=""):
    """clip: (node, slot) of a CLIP for the trigger-word branch."""
    inputs = [("encoder", "QWEN_ENCODER", (encoder, 0))]
    if clip is not None:
        inputs.append(("clip", "CLIP", clip))
    return g.node(
        "QwenTextEncodeSDXL", pos, QWEN_SIZE, qwen_widgets(text, SIZE_1024, clip_text), inputs, title=title
    )


def clip_encode(g, pos, ckpt, text, title):
    return g.node(
        "CLIPTextEncodeSDXL",
        pos,
        (400, 290),
        [
            ("width", 1024),
            ("height", 1024),
            ("crop_w", 0),
            ("crop_h", 0),
            ("target_width", 1024),
            ("target_height", 1024),
            ("text_g", text),
            ("text_l", text),
        ],
        [("clip", "CLIP", (ckpt, 1))],
        title=title,
    )


def sample(g, x, y, ckpt, pos, neg, latent, prefix, seed=42, title=None, steps=25, vae=None):
    """KSampler (MODEL from `ckpt`) -> VAE Decode (`vae`, default the checkpoint's) -> Save."""
    k = g.node(
        "KSampler",
        (x, y),
        (320, 262),
        [
            ("seed", seed),
            ("control_after_generate", "fixed"),
            ("steps", steps),
            ("cfg", 7.0),
            ("sampler_name", "euler"),
            ("scheduler", "normal"),
            ("denoise", 1.0),
        ],
        [
            ("model", "MODEL", (ckpt, 0)),
            ("positive", "CONDITIONING", (pos, 0)),
            ("negative", "CONDITIONING", (neg, 0)),
            ("latent_image", "LATENT", (latent, 0)),
        ],
        title=title,
    )
    d = g.node(
        "VAEDecode",
        (x + 350, y),
        (210, 46),
        [],
        [("samples", "LATENT", (k, 0)), ("vae", "VAE", vae or (ckpt, 2))],
    )
    g.node(
        "SaveImage", (x + 590, y), (400, 420), [("filename_prefix", prefix)], [("images", "IMAGE", (d, 0))]
    )


def text_to_image() -> Graph:
    g = Graph()
    note(
        g,
        f"""
SDXL text-to-image with Qwen Text Encode (SDXL) for both prompts.

What to set:
1. Load Checkpoint: your SDXL checkpoint (models/checkpoints). Its CLIP is not used here.
2. Qwen Encoder Loader:
   - base_model: the Qwen3 model the adapter was trained on: a folder in
     models/text_encoders (config.json + *.safetensors + tokenizer.json) or a hub id
     (read from the Hugging Face cache).
   - adapter: your adapter folder in models/qwenclip ("{ADAPTER}" is what the
     training workflow writes). Without an adapter there is no conditioning.
   - device / dtype: auto = CUDA + bf16 when the CUDA build and a GPU are there.
3. The prompts take ComfyUI's weighting, as CLIP Text Encode does: (word:1.2), (word)
   x1.1, \\( \\) for literal brackets (prompt_syntax: comfy, a1111 or none).
4. width/height (and target_*) are SDXL's size conditioning: keep them equal to the image
   size set in Empty Latent Image.
""",
    )
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), [("ckpt_name", CKPT)])
    enc = loader(g, (0, 160))
    pos = qwen_encode(g, (360, 0), enc, PROMPT, "Positive (Qwen)")
    neg = qwen_encode(g, (360, 440), enc, NEGATIVE, "Negative (Qwen)")
    lat = g.node(
        "EmptyLatentImage", (0, 380), (320, 106), [("width", 1024), ("height", 1024), ("batch_size", 1)]
    )
    sample(g, 800, 0, ckpt, pos, neg, lat, "qwenclip/text_to_image")
    return g


def train_then_generate() -> Graph:
    g = Graph()
    note(
        g,
        """
Train a qwenclip adapter on your own captions, then generate with it.

Qwen Adapter Train distils your checkpoint's own CLIP (the teacher) into the Qwen encoder:
for every caption, ComfyUI's CLIP encode computes the target conditioning.

What to set:
1. Load Checkpoint: the SDXL checkpoint whose CLIP the adapter should match
   (fine-tuned checkpoints included).
2. Qwen Encoder Loader: the Qwen3 base model; adapter "none" starts a new adapter
   (an adapter here is the starting point when init = "encoder adapter").
3. Qwen Adapter Train:
   - adapter_name: the folder models/qwenclip/<adapter_name>. If it holds a checkpoint,
     training RESUMES from it up to `steps`.
   - captions_folder: a folder in ComfyUI's input directory: a .txt beside an image is that
     image's caption, other .txt files hold one caption per line, .jsonl/.csv a caption
     column; and/or captions_text (one caption per line). Use thousands of varied captions
     for a useful adapter; the ones below only show the format.
   - steps, batch_size, grad_accum, lr_lora, lr_resampler, save_every: the defaults suit
     a GPU run; a checkpoint + the adapter are written every save_every steps.
   - Cancel stops cleanly after saving; queue again to resume.
4. The loss curve goes to the preview; the trained encoder feeds the prompts below.
""",
        size=(460, 640),
    )
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), [("ckpt_name", CKPT)])
    enc = loader(g, (0, 160), adapter="none")
    train = train_node(g, (360, 0), enc, ckpt, ADAPTER)
    g.node("PreviewImage", (820, 880), (420, 300), [], [("images", "IMAGE", (train, 1))], title="Loss curve")
    pos = qwen_encode(g, (820, 0), train, PROMPT, "Positive (trained adapter)")
    neg = qwen_encode(g, (820, 440), train, NEGATIVE, "Negative (trained adapter)")
    lat = g.node(
        "EmptyLatentImage", (0, 380), (320, 106), [("width", 1024), ("height", 1024), ("batch_size", 1)]
    )
    sample(g, 1260, 0, ckpt, pos, neg, lat, "qwenclip/trained_adapter")
    return g


def train_node(g, pos, encoder, ckpt, adapter_name, objective="mse", **overrides):
    """Qwen Adapter Train with the library's defaults in every widget (some overridden); the
    checkpoint's MODEL connected as the judge for the vision objectives."""
    d = train_defaults()
    v = d["vision"]
    settings = ["steps", "batch_size", "grad_accum", "lr_lora", "lr_resampler", "save_every", "seed"]
    optional = [
        "lora_r",
        "lora_alpha",
        "resampler_width",
        "resampler_heads",
        "resampler_layers",
        "resampler_ff_mult",
        "warmup_steps",
        "schedule",
    ]
    value = {**d, **v, **overrides}
    inputs = [("encoder", "QWEN_ENCODER", (encoder, 0)), ("clip", "CLIP", (ckpt, 1))]
    if objective != "mse":
        inputs.append(("model", "MODEL", (ckpt, 0)))
    return g.node(
        "QwenAdapterTrain",
        pos,
        (420, 820),
        [
            ("adapter_name", adapter_name),
            ("captions_folder", "none (use captions_text)"),
            ("captions_text", CAPTIONS),
            *[(k, value[k]) for k in settings],
            ("init", "encoder adapter"),
            *[(k, value[k]) for k in optional],
            ("objective", objective),
            *[(k, value[k]) for k in ("resolution", "denoise_steps", "guidance_min", "guidance_max")],
            ("scheduler", "normal"),
        ],
        inputs,
    )


def train_vision() -> Graph:
    g = Graph()
    note(
        g,
        f"""
Train a qwenclip adapter with vision-based distillation: your checkpoint's own UNet judges
the Qwen encoder, then the same seed is rendered three ways, side by side:
CLIP (top), the adapter before training (middle), after (bottom).

The vision objective compares what the MODEL predicts with CLIP's conditioning and with
the Qwen encoder's, along the teacher's own sampling trajectories (pure noise, guided by
CLIP; no images needed). It keeps different prompts apart, where matching CLIP's outputs
alone can collapse them. Connect the MODEL after your LoRA / FreeU nodes: the adapter
learns for the model as you use it.

What to set:
1. Load Checkpoint: your SDXL checkpoint (eps or v-prediction).
2. Qwen Encoder Loader: the Qwen3 base and the adapter to start from ("{ADAPTER}", made by
   the training workflow with the mse objective, is a good start).
3. Qwen Adapter Train: objective vision (or mixed); resolution, denoise_steps (one
   training step each), guidance_min/max (CFG drawn per trajectory) and scheduler shape
   the trajectories. adapter_name is the run folder; Cancel saves, queueing again
   resumes.
""",
        size=(460, 640),
    )
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), [("ckpt_name", CKPT)])
    enc = loader(g, (0, 160))
    train = train_node(g, (360, 0), enc, ckpt, "my_adapter_vision", objective="vision", steps=200)
    g.node("PreviewImage", (360, 860), (420, 300), [], [("images", "IMAGE", (train, 1))], title="Loss curve")
    lat = g.node(
        "EmptyLatentImage", (0, 380), (320, 106), [("width", 1024), ("height", 1024), ("batch_size", 1)]
    )
    rows = [
        ("CLIP", None, "qwenclip/vision_clip"),
        ("adapter before", enc, "qwenclip/vision_before"),
        ("adapter after", train, "qwenclip/vision_after"),
    ]
    for i, (name, encoder, prefix) in enumerate(rows):
        y = i * 900
        if encoder is None:
            pos = clip_encode(g, (820, y), ckpt, PROMPT, f"Positive ({name})")
            neg = clip_encode(g, (820, y + 440), ckpt, NEGATIVE, f"Negative ({name})")
        else:
            pos = qwen_encode(g, (820, y), encoder, PROMPT, f"Positive ({name})")
            neg = qwen_encode(g, (820, y + 440), encoder, NEGATIVE, f"Negative ({name})")
        sample(g, 1260, y, ckpt, pos, neg, lat, prefix, title=f"KSampler ({name})")
    return g


def tiny_demo() -> Graph:
    g = Graph()
    note(
        g,
        """
The offline demo: tiny models, seconds on a CPU, a meaningless but real picture.

What to set (see the pack's README, "Try it offline"):
1. Tiny SDXL (offline demo): a tiny SDXL made in memory (random weights, nothing to
   download); for real work use Load Checkpoint with an SDXL checkpoint.
2. Qwen Encoder Loader: "qwen3-tiny" and the adapter "tiny", the folders `qwenclip-dev tiny`
   writes, copied to models/text_encoders/qwen3-tiny and models/qwenclip/tiny.
3. Queue: a 64x64 picture appears in Save Image. Another prompt gives another picture; the
   same seed and prompt give the same one.
""",
        size=(420, 420),
    )
    ckpt = g.node(
        "QwenDemoTinySDXL",
        (0, 0),
        (320, 98),
        [("seed", 0), ("control_after_generate", "fixed")],
        title="Tiny SDXL (offline demo)",
    )
    enc = loader(g, (0, 160), adapter="tiny", base="qwen3-tiny", device="cpu", dtype="f32")
    pos = g.node(
        "QwenTextEncodeSDXL",
        (360, 0),
        QWEN_SIZE,
        qwen_widgets("a red cube left of a blue sphere", SIZE_64),
        [("encoder", "QWEN_ENCODER", (enc, 0))],
        title="Positive",
    )
    neg = g.node(
        "QwenTextEncodeSDXL",
        (360, 440),
        QWEN_SIZE,
        qwen_widgets("", SIZE_64),
        [("encoder", "QWEN_ENCODER", (enc, 0))],
        title="Negative",
    )
    lat = g.node("EmptyLatentImage", (0, 400), (320, 106), [("width", 64), ("height", 64), ("batch_size", 1)])
    sample(g, 800, 0, ckpt, pos, neg, lat, "qwenclip/tiny_demo", steps=4)
    return g


def clip_vs_qwen() -> Graph:
    g = Graph()
    note(
        g,
        f"""
CLIP vs Qwen, side by side: the same checkpoint, prompt, seed and sampler, conditioned
once by the checkpoint's own CLIP (CLIP Text Encode SDXL, top) and once by Qwen Text
Encode (SDXL) with your adapter (bottom). Both images are saved under qwenclip/compare_*.

What to set:
1. Load Checkpoint: your SDXL checkpoint.
2. Qwen Encoder Loader: the Qwen3 base model and the adapter trained for this checkpoint
   ("{ADAPTER}" is what the training workflow writes).
3. Write the same prompt in both positive nodes (and both negatives). Both KSamplers use
   seed 42 ("fixed"): change both together.
""",
    )
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), [("ckpt_name", CKPT)])
    cpos = clip_encode(g, (360, 0), ckpt, PROMPT, "Positive (CLIP)")
    cneg = clip_encode(g, (360, 320), ckpt, NEGATIVE, "Negative (CLIP)")
    enc = loader(g, (0, 700))
    qpos = qwen_encode(g, (360, 700), enc, PROMPT, "Positive (Qwen)")
    qneg = qwen_encode(g, (360, 1140), enc, NEGATIVE, "Negative (Qwen)")
    lat = g.node(
        "EmptyLatentImage", (0, 380), (320, 106), [("width", 1024), ("height", 1024), ("batch_size", 1)]
    )
    sample(g, 800, 0, ckpt, cpos, cneg, lat, "qwenclip/compare_clip", title="KSampler (CLIP)")
    sample(g, 800, 700, ckpt, qpos, qneg, lat, "qwenclip/compare_qwen", title="KSampler (Qwen)")
    return g


LORA = "my_character_lora.safetensors"
TRIGGER = "my_trigger_word"


def lora_trigger() -> Graph:
    g = Graph()
    note(
        g,
        f"""
A LoRA with trigger words, with Qwen Text Encode (SDXL): the prompt goes through Qwen,
and the trigger words through the checkpoint's own CLIP (with the LoRA applied), appended
after the Qwen tokens.

When to use the CLIP branch (clip + clip_text):
- a LoRA trained on CLIP with trigger words (its UNet learnt to answer CLIP's trigger
  tokens, which Qwen never makes);
- textual inversions: embedding:name in the prompt cannot feed the LLM, so it is taken
  out of the Qwen text and goes through this CLIP (a warning says so);
- tags CLIP knows and Qwen's adapter does not (artist names, booru tags).
Without any of these, leave clip_text empty: plain Qwen conditioning.

What to set:
1. Load Checkpoint: your SDXL checkpoint.
2. Load LoRA: your LoRA; strength_model and strength_clip as the LoRA's author says.
   Its CLIP goes to the positive's clip input, its MODEL to the KSampler.
3. Qwen Encoder Loader: the Qwen3 base and the adapter for this checkpoint.
4. Positive: the prompt (weights as in CLIP Text Encode: (word:1.2)); clip_text: the
   trigger words ("{TRIGGER}" here). clip_strength scales the CLIP tokens;
   clip_pooled_blend 0 keeps Qwen's pooled vector, 1 takes CLIP's.
""",
        size=(460, 640),
    )
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), [("ckpt_name", CKPT)])
    lora = g.node(
        "LoraLoader",
        (0, 140),
        (320, 130),
        [("lora_name", LORA), ("strength_model", 1.0), ("strength_clip", 1.0)],
        [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1))],
    )
    enc = loader(g, (0, 310))
    prompt = "a photo of (a red fox:1.2) sitting in fresh snow, soft morning light, detailed fur"
    pos = qwen_encode(
        g, (360, 0), enc, prompt, "Positive (Qwen + LoRA trigger)", clip=(lora, 1), clip_text=TRIGGER
    )
    neg = qwen_encode(g, (360, 440), enc, NEGATIVE, "Negative (Qwen)")
    lat = g.node(
        "EmptyLatentImage", (0, 530), (320, 106), [("width", 1024), ("height", 1024), ("batch_size", 1)]
    )
    sample(g, 800, 0, lora, pos, neg, lat, "qwenclip/lora_trigger", vae=(ckpt, 2))
    return g


WORKFLOWS = {
    "sdxl_qwen_text_to_image": text_to_image,
    "sdxl_qwen_train_then_generate": train_then_generate,
    "sdxl_qwen_tiny_demo": tiny_demo,
    "sdxl_qwen_train_vision": train_vision,
    "sdxl_clip_vs_qwen": clip_vs_qwen,
    "sdxl_qwen_lora_trigger": lora_trigger,
}

# What the shipped workflows name; tests create empty placeholders with these names so
# /prompt's validation (which checks names only) accepts the files as they are.
PLACEHOLDERS = {"checkpoints": [CKPT], "loras": [LORA], "adapters": [ADAPTER], "hub": [BASE]}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        g = build()
        (OUT / f"{name}.json").write_text(json.dumps(g.ui(), indent=2) + "\n")
        (OUT / f"{name}.api.json").write_text(json.dumps(g.api(), indent=2) + "\n")
        print(f"workflows/{name}.json, workflows/{name}.api.json")


if __name__ == "__main__":
    main()
