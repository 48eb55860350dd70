"""Generate the SDXL-teacher fixtures under tests/fixtures/teacher/ (see that folder's README.md).

What is written (the folder is wiped and rewritten, its README.md is kept):
  * diffusers/text_encoder/{config.json,model.safetensors}: a tiny random `CLIPTextModel`
    (CLIP-L stand-in, hidden_act quick_gelu), saved by `transformers` (float32);
  * diffusers/text_encoder_2/{config.json,model.safetensors}: a tiny random
    `CLIPTextModelWithProjection` (CLIP-G stand-in, hidden_act gelu = exact erf GELU);
  * sdxl_single.safetensors: the SAME weights as a single-file SDXL checkpoint (float16):
    CLIP-L in Hugging Face layout under `conditioner.embedders.0.transformer.`, CLIP-G converted
    to the open_clip layout under `conditioner.embedders.1.model.` (q/k/v concatenated into
    `attn.in_proj_*`, `text_projection` transposed), plus a few UNet/VAE keys to be ignored;
  * expected.safetensors: token ids with SDXL padding and the float64 reference outputs;
  * tokenizer_cases.json: CLIP tokenizer ids (diffusers' settings) for a few prompts.

Every weight is rounded to float16 before anything is saved, so the float32 diffusers files and
the float16 single file hold exactly the same values and must give the same outputs.

Run:  python tests/reference/make_teacher_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "teacher"
CLIP_TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "clip_tokenizer.json"

SEED = 20250301
SIZE_BUDGET = 3_000_000  # bytes, all teacher fixtures together

# A small vocabulary laid out like CLIP's: the start and end tokens are the last two ids
# (49406/49407 in the real one). The single-file loader infers eos = vocab_size - 1.
VOCAB = 256
BOS = VOCAB - 2
EOS = VOCAB - 1
SEQ = 77  # SDXL: BOS + 75 tokens + EOS
G_PAD = 0  # CLIP-G pads with id 0 ("!" in the real vocabulary), CLIP-L with EOS

# Same key values as the real SDXL configs (stabilityai/stable-diffusion-xl-base-1.0 ships
# bos 0, eos 2, pad 1: pre-#24773 values, so transformers pools at argmax(input_ids)).
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=SEQ, layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, attn_implementation="sdpa")
# heads = hidden / 64 on both, so the single-file loader (which has no config and uses
# head_dim 64 for widths other than 768/1280) infers the same attention layout.
L_CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
             hidden_act="quick_gelu", projection_dim=64, **COMMON)
G_CFG = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
             hidden_act="gelu", projection_dim=48, **COMMON)

# Batch of three: 5 content tokens, 80 content tokens (already cut to 75 as a tokenizer would),
# and the empty prompt.
CONTENT_LENGTHS = [5, 75, 0]

# float64 reference vs. the same math elsewhere.
TOL_F64 = 1e-10
TOL_EAGER = 1e-5  # transformers' eager attention runs its softmax in float32 even for float64


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"self-check failed: {msg}")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().cpu()


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and every LayerNorm has a
    visible affine; all values rounded to float16 so both fixture layouts hold them exactly."""
    torch.manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "layer_norm" in name or "final_layer_norm" in name:
            v = 0.2 * torch.randn_like(p) + (1 if name.endswith("weight") else 0)
        elif "token_embedding" in name:
            v = torch.randn_like(p)
        elif "position_embedding" in name:
            v = 0.5 * torch.randn_like(p)
        elif name.endswith("bias"):
            v = 0.1 * torch.randn_like(p)
        else:  # linear weights [out, in]
            v = torch.randn_like(p) * (1.5 / p.shape[1] ** 0.5)
        p.data = v.half().float()


def build(cls, cfg: dict, seed: int):
    model = cls(CLIPTextConfig(**cfg)).eval()
    randomise(model, seed)
    n_ln = sum(1 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    check(n_ln == 2 * cfg["num_hidden_layers"] + 1, f"{cls.__name__}: {n_ln} LayerNorms")
    return model


# --------------------------------------------------------------------------------------------
# Single-file checkpoint (SDXL `conditioner.embedders.*`)
# --------------------------------------------------------------------------------------------

L_PREFIX = "conditioner.embedders.0.transformer."
G_PREFIX = "conditioner.embedders.1.model."


def hf_to_open_clip(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """`CLIPTextModelWithProjection` state dict -> open_clip `TextTransformer` names.
    open_clip keeps q/k/v in one `in_proj` (rows q, then k, then v, as torch's
    `nn.MultiheadAttention`) and applies its projection as `x @ text_projection`, so its
    `text_projection` is the transpose of HF's `text_projection.weight`."""
    t = "text_model."
    out = {
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": sd[t + "final_layer_norm.weight"],
        "ln_final.bias": sd[t + "final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
    }
    for i in range(layers):
        h = f"{t}encoder.layers.{i}."
        o = f"transformer.resblocks.{i}."
        out[o + "ln_1.weight"] = sd[h + "layer_norm1.weight"]
        out[o + "ln_1.bias"] = sd[h + "layer_norm1.bias"]
        out[o + "ln_2.weight"] = sd[h + "layer_norm2.weight"]
        out[o + "ln_2.bias"] = sd[h + "layer_norm2.bias"]
        out[o + "attn.in_proj_weight"] = torch.cat(
            [sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv"], dim=0)
        out[o + "attn.in_proj_bias"] = torch.cat(
            [sd[h + f"self_attn.{x}_proj.bias"] for x in "qkv"], dim=0)
        out[o + "attn.out_proj.weight"] = sd[h + "self_attn.out_proj.weight"]
        out[o + "attn.out_proj.bias"] = sd[h + "self_attn.out_proj.bias"]
        out[o + "mlp.c_fc.weight"] = sd[h + "mlp.fc1.weight"]
        out[o + "mlp.c_fc.bias"] = sd[h + "mlp.fc1.bias"]
        out[o + "mlp.c_proj.weight"] = sd[h + "mlp.fc2.weight"]
        out[o + "mlp.c_proj.bias"] = sd[h + "mlp.fc2.bias"]
    # q/k/v weights and biases (6 tensors) become in_proj_weight/in_proj_bias (2) per layer.
    check(len(out) == len(sd) - 4 * layers, f"open_clip conversion: {len(out)} of {len(sd)}")
    return out


def open_clip_forward(oc: dict[str, torch.Tensor], ids: torch.Tensor, heads: int,
                      act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's `encode_text` math written directly on the open_clip tensors (float64):
    an independent check that the conversion means what open_clip means by it.
    Returns (output of the penultimate block, pooled projection at argmax(ids))."""
    oc = {k: v.double() for k, v in oc.items()}
    n = max(int(k.split(".")[2]) for k in oc if k.startswith("transformer.resblocks.")) + 1
    t = ids.shape[1]
    x = oc["token_embedding.weight"][ids] + oc["positional_embedding"][:t]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    width = x.shape[-1]
    penult = None
    for i in range(n):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), oc[p + "ln_1.weight"], oc[p + "ln_1.bias"], 1e-5)
        a, _ = F.multi_head_attention_forward(
            h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), width, heads,
            oc[p + "attn.in_proj_weight"], oc[p + "attn.in_proj_bias"], None, None, False, 0.0,
            oc[p + "attn.out_proj.weight"], oc[p + "attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (width,), oc[p + "ln_2.weight"], oc[p + "ln_2.bias"], 1e-5)
        h = F.linear(h, oc[p + "mlp.c_fc.weight"], oc[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
        x = x + F.linear(h, oc[p + "mlp.c_proj.weight"], oc[p + "mlp.c_proj.bias"])
        if i == n - 2:
            penult = x
    x = F.layer_norm(x, (width,), oc["ln_final.weight"], oc["ln_final.bias"], 1e-5)
    pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ oc["text_projection"]
    return penult, pooled


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def sdxl_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids as SDXL's two tokenizers make them: BOS + content + EOS, padded to 77 with EOS for
    CLIP-L and with 0 for CLIP-G. Content ids avoid BOS/EOS."""
    torch.manual_seed(seed)
    ids_l = torch.full((len(CONTENT_LENGTHS), SEQ), EOS, dtype=torch.int64)
    ids_g = torch.full((len(CONTENT_LENGTHS), SEQ), G_PAD, dtype=torch.int64)
    for i, n in enumerate(CONTENT_LENGTHS):
        row = torch.cat([torch.tensor([BOS]), torch.randint(0, BOS, (n,)), torch.tensor([EOS])])
        ids_l[i, : n + 2] = row
        ids_g[i, : n + 2] = row
    return ids_l, ids_g


def pool_rule_rows(seed: int) -> torch.Tensor:
    """Rows where transformers' two pooling rules could disagree. Row 0 has no EOS and no
    BOS, and its largest id twice (positions 30 and 50): argmax(ids) takes position 30, the
    first-EOS rule position 0 (argmax of an all-zero row). Row 1 has EOS at 10 followed by more
    content, row 2 EOS at 20 and 40: both rules take the first EOS."""
    torch.manual_seed(seed)
    rows = torch.randint(1, BOS - 1, (3, SEQ), dtype=torch.int64)
    rows[0, 30] = BOS - 1
    rows[0, 50] = BOS - 1
    rows[1, 0] = BOS
    rows[1, 10] = EOS
    rows[2, 0] = BOS
    rows[2, 20] = EOS
    rows[2, 40] = EOS
    return rows


# --------------------------------------------------------------------------------------------
# Tokenizer reference (diffusers' tokenizer + tokenizer_2 settings)
# --------------------------------------------------------------------------------------------

TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "",
    "   A  Photo\tOF a CAT!!  ",
    "an astronaut riding a horse, 8k, (masterpiece:1.2), trending on artstation",
    "café déjà-vu 123 naïve",
    "hello! world",
    " ".join(["red cube"] * 50),  # 100 content tokens: 25 dropped
]


def tokenizer_cases() -> list[dict]:
    """`ids_l`: diffusers' `tokenizer` (pads with `<|endoftext|>`). `ids_g`: the same prompt
    tokens padded with 0 after the end token, which is what SDXL was trained with (open_clip's
    tokenizer) and what ComfyUI feeds CLIP-G. `ids_g_diffusers`: diffusers' `tokenizer_2`
    (`pad_token="!"`), kept for the record: making "!" the pad token also makes it a special
    token that is split out of the text, so every "!" in a prompt becomes id 0 instead of
    being merged by BPE ("hello!" -> [3306, 0] instead of [3306, 256]). qwenclip follows
    open_clip/ComfyUI there."""
    l_tok = CLIPTokenizerFast(tokenizer_file=str(CLIP_TOKENIZER), pad_token="<|endoftext|>")
    g_tok = CLIPTokenizerFast(tokenizer_file=str(CLIP_TOKENIZER), pad_token="!")
    check(g_tok.pad_token_id == 0, f"'!' is id {g_tok.pad_token_id}, expected 0")
    cases = []
    for p in TOKENIZER_PROMPTS:
        kw = dict(padding="max_length", max_length=SEQ, truncation=True)
        content = l_tok(p, add_special_tokens=False).input_ids
        ids_l = l_tok(p, **kw).input_ids
        end = ids_l.index(49407)
        ids_g = ids_l[: end + 1] + [G_PAD] * (SEQ - end - 1)
        cases.append({
            "prompt": p,
            "ids_l": ids_l,
            "ids_g": ids_g,
            "ids_g_diffusers": g_tok(p, **kw).input_ids,
            "dropped": max(0, len(content) - (SEQ - 2)),
        })
    check(cases[0]["ids_l"][:7] == [49406, 320, 1125, 539, 320, 2368, 49407], "cat prompt ids")
    check(cases[-1]["dropped"] == 25, f"long prompt dropped {cases[-1]['dropped']}")
    for c in cases:
        same = c["ids_g"] == c["ids_g_diffusers"]
        check(same == ("!" not in c["prompt"]), f"diffusers' '!' quirk on {c['prompt']!r}")
    return cases


# --------------------------------------------------------------------------------------------

def main() -> None:
    torch.set_grad_enabled(False)
    keep = (OUT / "README.md").read_text() if (OUT / "README.md").exists() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "diffusers").mkdir(parents=True)
    if keep is not None:
        (OUT / "README.md").write_text(keep)

    clip_l = build(CLIPTextModel, L_CFG, SEED + 1)
    clip_g = build(CLIPTextModelWithProjection, G_CFG, SEED + 2)
    l_dir = OUT / "diffusers" / "text_encoder"
    g_dir = OUT / "diffusers" / "text_encoder_2"
    clip_l.save_pretrained(l_dir, safe_serialization=True)
    clip_g.save_pretrained(g_dir, safe_serialization=True)

    # The single file, from the same state dicts.
    sd_l = {k: v for k, v in clip_l.state_dict().items()}
    sd_g = {k: v for k, v in clip_g.state_dict().items()}
    oc_g = hf_to_open_clip(sd_g, G_CFG["num_hidden_layers"])
    single = {L_PREFIX + k: v.half() for k, v in sd_l.items()}
    # Real checkpoints often carry this buffer; the loader must ignore it.
    single[L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(SEQ).unsqueeze(0)
    single.update({G_PREFIX + k: v.half() for k, v in oc_g.items()})
    torch.manual_seed(SEED + 3)
    single["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3).half()
    single["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3).half()
    single[G_PREFIX + "logit_scale"] = torch.tensor(4.6).half()
    safetensors.torch.save_file(single, OUT / "sdxl_single.safetensors",
                                metadata={"format": "pt"})

    # Reference: reload what was saved, in float64, SDPA attention (all float64).
    # transformers 4.57's causal mask is built with `torch.full(.., finfo(dtype).min)` in the
    # DEFAULT dtype, which overflows for a float64 model unless float64 is the default.
    torch.set_default_dtype(torch.float64)
    ref_l = CLIPTextModel.from_pretrained(l_dir, dtype=torch.float64,
                                          attn_implementation="sdpa").eval()
    ref_g = CLIPTextModelWithProjection.from_pretrained(g_dir, dtype=torch.float64,
                                                        attn_implementation="sdpa").eval()
    for name, t in ref_l.state_dict().items():
        check(torch.equal(t.float(), sd_l[name]), f"L reload {name}")
    ids_l, ids_g = sdxl_rows(SEED + 4)
    out_l = ref_l(input_ids=ids_l, output_hidden_states=True)
    out_g = ref_g(input_ids=ids_g, output_hidden_states=True)
    check(len(out_l.hidden_states) == L_CFG["num_hidden_layers"] + 1, "L hidden_states count")
    l_pen = out_l.hidden_states[-2]
    g_pen = out_g.hidden_states[-2]
    prompt_embeds = torch.cat([l_pen, g_pen], dim=-1)
    pooled = out_g.text_embeds
    # The end token is the first EOS in every row; argmax(ids) (eos_token_id == 2) finds it too.
    g_last = out_g.last_hidden_state
    first_eos = (ids_g == EOS).int().argmax(-1)
    check(torch.equal(first_eos, ids_g.argmax(-1)), "argmax(ids) == first EOS on SDXL rows")
    check(max_abs(g_last[torch.arange(3), first_eos] @ ref_g.text_projection.weight.t(), pooled)
          < TOL_F64, "pooled = final norm at first EOS, projected")

    # Independent open_clip-style forward on the single file's tensors.
    single_back = safetensors.torch.load_file(OUT / "sdxl_single.safetensors")
    oc_back = {k[len(G_PREFIX):]: v for k, v in single_back.items()
               if k.startswith(G_PREFIX) and k != G_PREFIX + "logit_scale"}
    oc_pen, oc_pooled = open_clip_forward(oc_back, ids_g, G_CFG["num_attention_heads"], "gelu")
    check(max_abs(oc_pen, g_pen) < TOL_F64, f"open_clip penultimate {max_abs(oc_pen, g_pen):e}")
    check(max_abs(oc_pooled, pooled) < TOL_F64, f"open_clip pooled {max_abs(oc_pooled, pooled):e}")

    # Eager attention (float32 softmax) agrees to float32 precision.
    eager_g = CLIPTextModelWithProjection.from_pretrained(g_dir, dtype=torch.float64,
                                                          attn_implementation="eager").eval()
    e = eager_g(input_ids=ids_g, output_hidden_states=True)
    check(max_abs(e.text_embeds, pooled) < TOL_EAGER, "eager vs sdpa pooled")

    # The two pooling rules of transformers 4.57 (CLIPTextTransformer.forward):
    #   eos_token_id == 2 -> position argmax(input_ids); otherwise first position == eos_token_id.
    rule_ids = pool_rule_rows(SEED + 5)
    pooled_argmax = ref_g(input_ids=rule_ids).text_embeds
    ref_g_eos = CLIPTextModelWithProjection.from_pretrained(
        g_dir, dtype=torch.float64, attn_implementation="sdpa", eos_token_id=EOS).eval()
    check(ref_g_eos.text_model.eos_token_id == EOS, "eos override")
    pooled_first_eos = ref_g_eos(input_ids=rule_ids).text_embeds
    check(max_abs(pooled_argmax[0], pooled_first_eos[0]) > 1e-3, "rules differ on row 0")
    check(max_abs(pooled_argmax[1:], pooled_first_eos[1:]) < TOL_F64, "rules agree on rows 1, 2")

    expected = {
        "input_ids_l": ids_l,
        "input_ids_g": ids_g,
        "l_hidden_states_penultimate": f32(l_pen),
        "g_hidden_states_penultimate": f32(g_pen),
        "prompt_embeds": f32(prompt_embeds),
        "pooled_prompt_embeds": f32(pooled),
        "pool_rule_ids": rule_ids,
        "pooled_argmax_rule": f32(pooled_argmax),
        "pooled_first_eos_rule": f32(pooled_first_eos),
    }
    info = {
        "seed": SEED, "vocab": VOCAB, "bos": BOS, "eos": EOS, "seq": SEQ,
        "content_lengths": CONTENT_LENGTHS, "clip_l": L_CFG, "clip_g": G_CFG,
        "compute": "float64 (sdpa)", "store": "float32",
    }
    safetensors.torch.save_file(expected, OUT / "expected.safetensors",
                                metadata={"qwenclip.case": json.dumps(info, sort_keys=True)})
    cases = tokenizer_cases()  # one case per line
    (OUT / "tokenizer_cases.json").write_text(
        "[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")

    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    total = sum(p.stat().st_size for p in files)
    check(total < SIZE_BUDGET, f"fixtures take {total} bytes (budget {SIZE_BUDGET})")
    manifest = {
        "generator": "tests/reference/make_teacher_fixtures.py",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "seed": SEED,
        "files": {str(p.relative_to(OUT)): {"bytes": p.stat().st_size,
                                            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                  for p in files},
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(files)} files, {total} bytes, under {OUT}")


if __name__ == "__main__":
    sys.exit(main())
