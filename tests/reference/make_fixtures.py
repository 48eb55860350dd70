"""Generate the parity fixtures under tests/fixtures/parity/ (see that folder's README.md).

Everything the Rust side is compared against comes from here:
  * three tiny random Qwen3 models saved with `transformers` (one tied, one GQA, one bf16+sharded),
  * a PEFT LoRA for each, saved with `peft`,
  * a Perceiver Resampler (tests/reference/resampler.py) in safetensors and in `.pth` form,
  * expected outputs computed in float64 and stored as float32.

Run:  python tests/reference/make_fixtures.py
The output folder is wiped and rewritten (its README.md is kept). Every random object is created
right after its own `torch.manual_seed`, so adding or reordering objects never changes the others.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import platform
import re
import shutil
import struct
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy
import peft
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resampler import PerceiverResampler, ResamplerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "parity"

# One base seed; each object gets SEED + a fixed offset (listed in MANIFEST.json).
SEED = 20250101

VOCAB = 1024
PAD_ID = 0
LENGTHS = [7, 12, 1]  # batch of three prompts, right padded to max(LENGTHS)
T_MAX = max(LENGTHS)
LORA_R = 4
LORA_ALPHA = 8

# Tolerances for self-checks. Reloaded-vs-in-memory runs do identical float64 arithmetic, so
# they should agree to rounding noise; anything bigger means a save/load path changed the math.
TOL_F64 = 1e-10
# transformers' Qwen3 is NOT pure float64 after `.double()`: RMSNorm normalises in float32,
# RoPE cos/sin are computed in float32, and eager attention runs softmax in float32. So two
# float64 runs that differ in batch shape or merge order agree only to ~1e-7, not ~1e-15.
TOL_HF = 1e-5


@dataclass
class ModelSpec:
    name: str
    seed_offset: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    intermediate: int
    tied: bool
    rope_theta: float
    eps: float
    lora_targets: list[str]
    use_rslora: bool = False
    bf16_sharded: bool = False


SPECS = [
    ModelSpec("gqa2_untied", 1, hidden=64, heads=4, kv_heads=2, head_dim=16, layers=2,
              intermediate=128, tied=False, rope_theta=1e6, eps=1e-6,
              lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ModelSpec("mha_tied", 2, hidden=48, heads=4, kv_heads=4, head_dim=12, layers=2,
              intermediate=96, tied=True, rope_theta=10000.0, eps=1e-5,
              lora_targets=["q_proj", "v_proj"], use_rslora=True),
    # head_dim 32 != hidden/heads (8): catches code that derives head_dim from hidden_size.
    ModelSpec("gqa4_hd32_bf16", 3, hidden=64, heads=8, kv_heads=2, head_dim=32, layers=3,
              intermediate=160, tied=False, rope_theta=1e6, eps=1e-6,
              lora_targets=["q_proj", "k_proj", "v_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj"],
              bf16_sharded=True),
]

RESAMPLER_CFG = ResamplerConfig(input_dim=64, width=32, heads=4, ff_mult=2, layers=4,
                                num_latents=77, output_dim=2048, pooled_dim=1280, norm_eps=1e-5)
RESAMPLER_LENGTHS = [7, 12, 0]  # third prompt is empty: all-zero mask

# Per-object seed offsets (models use 1..3 above; their LoRA = +10, their inputs = +20).
SEED_OFF_RESAMPLER = 100
SEED_OFF_RESAMPLER_CASE = 101
SEED_OFF_LEGACY_PTH = 102


def seed(offset: int) -> None:
    torch.manual_seed(SEED + offset)


def check(cond: bool, msg: str) -> None:
    # Explicit (not `assert`) so the checks also run under `python -O`.
    if not cond:
        raise RuntimeError(f"self-check failed: {msg}")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def case_metadata(info: dict) -> dict[str, str]:
    # One metadata key holding sorted JSON: the safetensors writer emits the metadata map in
    # hash order, so several keys would make the file bytes differ between runs.
    info = {**info, "compute": "float64", "store": "float32"}
    return {"qwenclip.case": json.dumps(info, sort_keys=True)}


def f32(t: torch.Tensor) -> torch.Tensor:
    """Float64 reference -> float32 for storage (contiguous, detached, CPU)."""
    return t.detach().to(torch.float32).contiguous().cpu()


# --------------------------------------------------------------------------------------------
# Qwen3 models + LoRA
# --------------------------------------------------------------------------------------------

def qwen3_config(s: ModelSpec) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=s.hidden,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        num_hidden_layers=s.layers,
        intermediate_size=s.intermediate,
        tie_word_embeddings=s.tied,
        rope_theta=s.rope_theta,
        rms_norm_eps=s.eps,
        max_position_embeddings=512,
        attention_bias=False,
        pad_token_id=PAD_ID,
        attn_implementation="eager",
    )


def build_base(s: ModelSpec) -> Qwen3ForCausalLM:
    seed(s.seed_offset)
    model = Qwen3ForCausalLM(qwen3_config(s)).eval()
    # HF initialises every RMSNorm weight to 1; perturb them so a Rust side that forgets to
    # apply a norm weight (input/post-attn/q_norm/k_norm/final norm) fails the comparison.
    n_norms = 0
    for m in model.modules():
        if isinstance(m, Qwen3RMSNorm):
            m.weight.data = 1 + 0.1 * torch.randn_like(m.weight.data)
            n_norms += 1
    # per layer: input, post_attention, q_norm, k_norm; plus the final norm.
    check(n_norms == 4 * s.layers + 1, f"{s.name}: found {n_norms} RMSNorms")
    return model


def lora_config(s: ModelSpec) -> LoraConfig:
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(s.lora_targets),
                      init_lora_weights=False, lora_dropout=0.0, use_rslora=s.use_rslora)


def add_lora(s: ModelSpec, base: Qwen3ForCausalLM):
    """Wraps `base` IN PLACE (PEFT injects layers into it)."""
    seed(s.seed_offset + 10)
    pm = get_peft_model(base, lora_config(s)).eval()
    # init_lora_weights=False already leaves B non-zero (kaiming-uniform like A), but set B
    # explicitly so the delta is clearly visible and independent of PEFT's init choices.
    n_b = 0
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, dtype=torch.float32).to(p.dtype)
            n_b += 1
    check(n_b == s.layers * len(s.lora_targets), f"{s.name}: {n_b} lora_B tensors")
    return pm


def make_inputs(s: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    seed(s.seed_offset + 20)
    ids = torch.full((len(LENGTHS), T_MAX), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(LENGTHS), T_MAX), dtype=torch.int64)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = torch.randint(0, VOCAB, (n,), dtype=torch.int64)
        mask[i, :n] = 1
    return ids, mask


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def load_base_f64(model_dir: Path) -> Qwen3ForCausalLM:
    # Load in the dtype it was saved in ("auto"), then upcast: for the bf16 model this makes the
    # reference exactly "bf16 weights, float64 arithmetic", which is what Rust should reproduce.
    m = Qwen3ForCausalLM.from_pretrained(model_dir, dtype="auto", attn_implementation="eager")
    check(m.config._attn_implementation == "eager", "eager attention not selected")
    check(m.model.rotary_emb.inv_freq.dtype == torch.float32, "inv_freq not float32")
    return m.double().eval()


def load_lora_f64(model_dir: Path) -> PeftModel:
    base = Qwen3ForCausalLM.from_pretrained(model_dir, dtype="auto", attn_implementation="eager")
    pm = PeftModel.from_pretrained(base, model_dir / "lora")
    pm = pm.double().eval()
    check(all(p.dtype == torch.float64 for p in pm.parameters()), "peft model not fully f64")
    return pm


def restore_rope(model):
    for m in model.modules():
        if isinstance(m, Qwen3RotaryEmbedding):
            inv_freq, _ = m.rope_init_fn(m.config, None)
            m.inv_freq = inv_freq
            m.original_inv_freq = inv_freq
    return model


LORA_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def verify_saved_model(s: ModelSpec, model_dir: Path, base: Qwen3ForCausalLM) -> dict:
    """Checks on the saved files themselves; returns notes for the report/manifest."""
    notes: dict = {}
    cfg = json.loads((model_dir / "config.json").read_text())
    check(cfg["head_dim"] == s.head_dim and cfg["tie_word_embeddings"] == s.tied,
          f"{s.name}: config.json fields")
    if s.bf16_sharded:
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        check(len(shards) >= 2, f"{s.name}: expected >=2 shards, got {shards}")
        check(not (model_dir / "model.safetensors").exists(), f"{s.name}: unexpected single file")
        files = [model_dir / f for f in shards]
        notes["shards"] = shards
    else:
        check(not (model_dir / "model.safetensors.index.json").exists(), f"{s.name}: index")
        files = [model_dir / "model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(safetensors.torch.load_file(f))
    want_dtype = torch.bfloat16 if s.bf16_sharded else torch.float32
    check(all(t.dtype == want_dtype for t in tensors.values()), f"{s.name}: stored dtype")
    notes["lm_head_stored"] = "lm_head.weight" in tensors
    check(notes["lm_head_stored"] == (not s.tied), f"{s.name}: lm_head presence vs tying")
    # Stored tensors must be exactly the in-memory ones.
    sd = base.state_dict()
    for k, t in tensors.items():
        check(torch.equal(t, sd[k]), f"{s.name}: stored {k} differs")

    lora_dir = model_dir / "lora"
    lt = safetensors.torch.load_file(lora_dir / "adapter_model.safetensors")
    seen = set()
    for k, t in lt.items():
        mm = LORA_KEY_RE.match(k)
        check(mm is not None, f"{s.name}: unexpected LoRA tensor name {k}")
        layer, _, proj, ab = mm.groups()
        check(proj in s.lora_targets, f"{s.name}: {k} not a target")
        check(t.shape[0 if ab == "A" else 1] == LORA_R, f"{s.name}: {k} rank dim {tuple(t.shape)}")
        seen.add((int(layer), proj, ab))
    check(len(seen) == len(lt) == s.layers * len(s.lora_targets) * 2, f"{s.name}: LoRA count")
    notes["lora_dtypes"] = sorted({str(t.dtype) for t in lt.values()})
    ac = json.loads((lora_dir / "adapter_config.json").read_text())
    check(ac["r"] == LORA_R and ac["lora_alpha"] == LORA_ALPHA
          and ac["use_rslora"] == s.use_rslora
          and sorted(ac["target_modules"]) == sorted(s.lora_targets),
          f"{s.name}: adapter_config.json fields")
    return notes


def normalise_adapter_config(lora_dir: Path) -> None:
    # PEFT stores target_modules as a Python set and dumps list(set): its order depends on
    # PYTHONHASHSEED, which would make adapter_config.json differ between runs. Sort it, using
    # PEFT's own formatting (indent=2, sort_keys=True) so the file is otherwise unchanged.
    p = lora_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def make_model_fixtures(s: ModelSpec) -> tuple[dict, dict]:
    """Returns (tensors kept for the chain case, notes)."""
    model_dir = OUT / "models" / s.name
    base = build_base(s)
    if s.bf16_sharded:
        base = base.to(torch.bfloat16)
        base.save_pretrained(model_dir, max_shard_size="100KB", safe_serialization=True)
    else:
        base.save_pretrained(model_dir, safe_serialization=True)

    base_mem = copy.deepcopy(base)  # get_peft_model mutates `base`; keep a clean copy
    pm = add_lora(s, base)
    pm.save_pretrained(model_dir / "lora")
    # PEFT also writes a model-card README.md; it is boilerplate, not part of the format.
    (model_dir / "lora" / "README.md").unlink(missing_ok=True)
    normalise_adapter_config(model_dir / "lora")
    notes = verify_saved_model(s, model_dir, base_mem)

    ids, mask = make_inputs(s)

    # --- the reference: what was saved, reloaded, upcast to float64 ---
    ref_base = load_base_f64(model_dir)
    hs = hidden_states(ref_base, ids, mask)
    check(len(hs) == s.layers + 1, f"{s.name}: {len(hs)} hidden states")
    ref_lora = load_lora_f64(model_dir)
    hs_lora = hidden_states(ref_lora, ids, mask)

    # --- semantics checks the Rust side relies on (docs/adapter-format.md, `hidden_layer`) ---
    captured = {}

    def grab(_mod, args, out):
        captured["in"] = args[0]
        captured["out"] = out[0] if isinstance(out, tuple) else out

    hook = ref_base.model.layers[-1].register_forward_hook(grab)
    with torch.no_grad():
        inner = ref_base.model(input_ids=ids, attention_mask=mask, use_cache=False)
    hook.remove()
    with torch.no_grad():
        check(torch.equal(hs[-1], inner.last_hidden_state), "hidden_states[-1] != last_hidden_state")
        # hs[-1] = final RMSNorm(last decoder layer output); hs[-2] = input of the last layer,
        # i.e. the raw (un-normed) output of the layer before it; hs[0] = token embeddings.
        check(torch.equal(hs[-1], ref_base.model.norm(captured["out"])), "hs[-1] is not post-norm")
        check(torch.equal(hs[-2], captured["in"]), "hs[-2] is not the last layer's input")
        check(torch.equal(hs[0], ref_base.model.embed_tokens(ids)), "hidden_states[0] != embeddings")
        check(max_abs(ref_base.model.norm(hs[-2]), hs[-2]) > 1e-3, "norm is ~identity; weak test")

    # --- cross-check the reference against the in-memory (pre-save) objects ---
    # Surprise: `model.to(torch.bfloat16)` also casts RoPE's non-persistent `inv_freq` buffer to
    # bf16, while `from_pretrained` recomputes it in float32 from the config. Rebuild it on the
    # in-memory copies, otherwise the bf16 model differs from its own reload by ~1e-3.
    mem_base = restore_rope(copy.deepcopy(base_mem)).double().eval()
    mem_lora = restore_rope(copy.deepcopy(pm)).double().eval()
    d_base = max_abs(hidden_states(mem_base, ids, mask)[-1], hs[-1])
    d_lora = max_abs(hidden_states(mem_lora, ids, mask)[-1], hs_lora[-1])
    check(d_base <= TOL_F64 and d_lora <= TOL_F64, f"{s.name}: reload mismatch {d_base} {d_lora}")
    # The LoRA must actually change the output (B is non-zero), and by a visible amount.
    lora_effect = max_abs(hs_lora[-1], hs[-1])
    check(lora_effect > 1e-2, f"{s.name}: LoRA effect only {lora_effect}")

    # The documented formula, y = W x + s * B (A x) with s = alpha/r (or alpha/sqrt(r) for
    # rsLoRA), must be exactly what PEFT computes, layer by layer.
    want_s = LORA_ALPHA / math.sqrt(LORA_R) if s.use_rslora else LORA_ALPHA / LORA_R
    n_checked = 0
    with torch.no_grad():
        for m in ref_lora.modules():
            if isinstance(m, peft.tuners.lora.Linear):
                check(m.scaling["default"] == want_s, f"{s.name}: PEFT scaling {m.scaling}")
                x = torch.randn(5, m.in_features, dtype=torch.float64)
                a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                y_doc = x @ m.base_layer.weight.T + want_s * ((x @ a.T) @ b.T)
                check(max_abs(m(x), y_doc) <= TOL_F64, f"{s.name}: LoRA formula")
                n_checked += 1
    check(n_checked == s.layers * len(s.lora_targets), f"{s.name}: {n_checked} LoRA layers")
    # Merged must match unmerged (up to the float32 islands inside transformers' Qwen3).
    merged = copy.deepcopy(ref_lora).merge_and_unload()
    d_merge = max_abs(hidden_states(merged, ids, mask)[-1], hs_lora[-1])
    check(d_merge <= TOL_HF, f"{s.name}: merged vs unmerged {d_merge}")

    tensors = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "hidden_last": f32(hs[-1]),
        "hidden_penult": f32(hs[-2]),
        "hidden_last_lora": f32(hs_lora[-1]),
    }
    pad_diff = 0.0
    for i, n in enumerate(LENGTHS):
        single_ids = ids[i:i + 1, :n]
        single = hidden_states(ref_base, single_ids, torch.ones_like(single_ids))[-1]
        tensors[f"hidden_last_single_{i}"] = f32(single)
        pad_diff = max(pad_diff, max_abs(single, hs[-1][i:i + 1, :n]))
    # Right padding + causal attention: real tokens never see padding, and HF uses positions
    # 0..T-1 regardless of the mask, so singles must match the batch on real positions.
    check(pad_diff <= TOL_HF, f"{s.name}: padding invariance {pad_diff}")

    (OUT / "cases").mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        tensors, OUT / "cases" / f"{s.name}.safetensors",
        metadata=case_metadata({"model": f"models/{s.name}", "lengths": LENGTHS,
                                "pad_id": PAD_ID}))

    notes.update(scaling=want_s, lora_effect=lora_effect, reload_diff=max(d_base, d_lora),
                 merge_diff=d_merge, padding_diff=pad_diff,
                 padded_rows_finite=bool(torch.isfinite(hs[-1]).all()))
    return {"ids": ids, "mask": mask, "hidden_lora_f64": hs_lora[-1]}, notes


# --------------------------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------------------------

def rename_for_pth(key: str) -> str:
    # Inverse of keymap.json's renames: make the .pth look like some other training codebase.
    if key.startswith("layers."):
        key = "blocks." + key[len("layers."):]
    return key.replace(".attn.", ".cross_attn.")


def apply_keymap(key: str, km: dict) -> str:
    # Mirror of the Rust import logic described in docs/adapter-format.md.
    for p in km["strip_prefixes"]:
        if key.startswith(p):
            key = key[len(p):]
            break
    for a, b in km["rename"]:
        key = key.replace(a, b)
    return key


def save_legacy_pth(obj: dict, path: Path) -> None:
    """torch.save(..., _use_new_zipfile_serialization=False), made byte-reproducible.

    The legacy format names each storage by its memory address (`str(storage._cdata)`), so the
    file changes on every run. Swap each address for its index. Legacy files use pickle protocol
    2 (no framing, no length fields around the pickles), so the key strings may change length.
    """
    tensors = [v for v in obj["state_dict"].values()]
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    for i, t in enumerate(tensors):
        key = str(t.untyped_storage()._cdata).encode()
        old = b"X" + struct.pack("<I", len(key)) + key  # pickle BINUNICODE
        new_key = str(i).encode()
        # once as the tensor's persistent id, once in the trailing list of storage keys
        check(data.count(old) == 2, "unexpected legacy .pth layout")
        data = data.replace(old, b"X" + struct.pack("<I", len(new_key)) + new_key)
    path.write_bytes(data)
    back = torch.load(path, weights_only=True)
    check(all(torch.equal(back["state_dict"][k], v) for k, v in obj["state_dict"].items()),
          "legacy .pth roundtrip")


def doc_forward(sd: dict, cfg: ResamplerConfig, h: torch.Tensor, mask: torch.Tensor):
    """Second, functional transcription of the doc's pseudo-code, straight from the tensor
    names. Guards resampler.py against drifting from docs/adapter-format.md."""

    def ln(x, p):
        return F.layer_norm(x, (cfg.width,), sd[p + ".weight"], sd[p + ".bias"], cfg.norm_eps)

    x = F.linear(h, sd["proj_in.weight"], sd["proj_in.bias"])
    lat = sd["latents"].expand(h.shape[0], -1, -1)
    d = cfg.width // cfg.heads
    bias = torch.cat([torch.where(mask == 1, 0.0, float("-inf")).to(h.dtype),
                      torch.zeros(h.shape[0], cfg.num_latents, dtype=h.dtype)], dim=1)
    for i in range(cfg.layers):
        p = f"layers.{i}."
        m, l = ln(x, p + "norm_media"), ln(lat, p + "norm_latents")
        kv = torch.cat([m, l], dim=1)
        q = (l @ sd[p + "attn.to_q.weight"].T).unflatten(-1, (cfg.heads, d))
        k = (kv @ sd[p + "attn.to_k.weight"].T).unflatten(-1, (cfg.heads, d))
        v = (kv @ sd[p + "attn.to_v.weight"].T).unflatten(-1, (cfg.heads, d))
        a = (torch.einsum("bnhd,bthd->bhnt", q, k) / math.sqrt(d) + bias[:, None, None]).softmax(-1)
        lat = lat + torch.einsum("bhnt,bthd->bnhd", a, v).flatten(2) @ sd[p + "attn.to_out.weight"].T
        f = F.linear(ln(lat, p + "ff.norm"), sd[p + "ff.fc1.weight"], sd[p + "ff.fc1.bias"])
        lat = lat + F.linear(0.5 * f * (1 + torch.erf(f / math.sqrt(2))),
                             sd[p + "ff.fc2.weight"], sd[p + "ff.fc2.bias"])
    pe = F.linear(ln(lat, "norm_out"), sd["proj_out.weight"], sd["proj_out.bias"])
    pooled = F.linear(ln(lat.mean(1), "pooled_norm"), sd["pooled_proj.weight"], sd["pooled_proj.bias"])
    return pe, pooled


def build_resampler() -> PerceiverResampler:
    seed(SEED_OFF_RESAMPLER)
    r = PerceiverResampler(RESAMPLER_CFG).eval()
    with torch.no_grad():
        # Torch's LayerNorm init is weight=1, bias=0; perturb so a missing affine is caught.
        for m in r.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
        r.latents.copy_(torch.randn_like(r.latents))
    return r


def make_resampler_fixtures() -> PerceiverResampler:
    rdir = OUT / "resampler"
    rdir.mkdir(parents=True, exist_ok=True)
    r = build_resampler()
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in r.state_dict().items()}
    cfg_json = RESAMPLER_CFG.to_json()
    safetensors.torch.save_file(sd, rdir / "resampler.safetensors",
                                metadata={"qwenclip.resampler": cfg_json})
    (rdir / "config.json").write_text(json.dumps(asdict(RESAMPLER_CFG), indent=2) + "\n")

    # Same weights as a zip-format .pth, nested + prefixed + renamed, to exercise the importer.
    nested = {"module." + rename_for_pth(k): v.clone() for k, v in sd.items()}
    torch.save({"epoch": 3, "state_dict": nested}, rdir / "resampler_nested.pth")
    keymap = {"nested_key": "state_dict", "strip_prefixes": ["module."],
              "rename": [["blocks.", "layers."], [".cross_attn.", ".attn."]],
              "config": {"heads": RESAMPLER_CFG.heads, "norm_eps": RESAMPLER_CFG.norm_eps}}
    (rdir / "keymap.json").write_text(json.dumps(keymap, indent=2) + "\n")

    # Legacy (pre-1.6, non-zip) torch.save: the Rust reader must reject it with a clear error.
    # Content is deliberately tiny (one small tensor, not the whole model): only the container
    # format matters for this negative test.
    seed(SEED_OFF_LEGACY_PTH)
    save_legacy_pth({"epoch": 3, "state_dict": {"module.latents": torch.randn(4, 8)}},
                    rdir / "not_a_zip.pth")

    # --- reload checks ---
    loaded, meta = {}, None
    with safetensors.safe_open(rdir / "resampler.safetensors", "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            loaded[k] = f.get_tensor(k)
    check(ResamplerConfig.from_json(meta["qwenclip.resampler"]) == RESAMPLER_CFG, "metadata cfg")
    r2 = PerceiverResampler(ResamplerConfig.from_json(meta["qwenclip.resampler"]))
    r2.load_state_dict(loaded, strict=True)
    check(all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), r2.state_dict().values())),
          "resampler safetensors roundtrip")
    obj = torch.load(rdir / "resampler_nested.pth", weights_only=True)
    check(obj["epoch"] == 3, "pth epoch")
    remapped = {apply_keymap(k, keymap): v for k, v in obj[keymap["nested_key"]].items()}
    check(remapped.keys() == sd.keys() and all(torch.equal(remapped[k], sd[k]) for k in sd),
          "pth keymap roundtrip")
    check(zipfile.is_zipfile(rdir / "resampler_nested.pth"), "nested pth must be zip")
    check(not zipfile.is_zipfile(rdir / "not_a_zip.pth"), "legacy pth must not be zip")

    # --- case ---
    seed(SEED_OFF_RESAMPLER_CASE)
    b = len(RESAMPLER_LENGTHS)
    hidden = torch.randn(b, T_MAX, RESAMPLER_CFG.input_dim)  # padded positions are random too:
    mask = torch.zeros(b, T_MAX, dtype=torch.int64)          # they must be ignored, not zeroed
    for i, n in enumerate(RESAMPLER_LENGTHS):
        mask[i, :n] = 1
    r64 = copy.deepcopy(r).double()
    with torch.no_grad():
        pe, pooled = r64(hidden.double(), mask)
        check(torch.isfinite(pe).all() and torch.isfinite(pooled).all(), "resampler non-finite")
        sd64 = {k: v.double() for k, v in loaded.items()}
        dpe, dpo = doc_forward(sd64, RESAMPLER_CFG, hidden.double(), mask)
        d = max(max_abs(dpe, pe), max_abs(dpo, pooled))
        check(d <= TOL_F64, f"resampler.py vs doc transcription: {d}")
        case = {"hidden": hidden.contiguous(), "attention_mask": mask,
                "prompt_embeds": f32(pe), "pooled": f32(pooled)}
        for i, n in enumerate(RESAMPLER_LENGTHS[:2]):
            spe, spo = r64(hidden[i:i + 1, :n].double(), None)
            d = max(max_abs(spe, pe[i:i + 1]), max_abs(spo, pooled[i:i + 1]))
            check(d <= TOL_F64, f"resampler padding invariance {d}")
            case[f"prompt_embeds_single_{i}"] = f32(spe)
            case[f"pooled_single_{i}"] = f32(spo)
        # The empty prompt must equal a run with zero media tokens.
        epe, epo = r64(hidden[2:3, :0].double(), None)
        check(max(max_abs(epe, pe[2:3]), max_abs(epo, pooled[2:3])) <= TOL_F64, "empty prompt")
    safetensors.torch.save_file(case, rdir / "case.safetensors",
                                metadata=case_metadata({"lengths": RESAMPLER_LENGTHS}))
    return r


def make_chain_fixture(r: PerceiverResampler, a: dict) -> None:
    # Model a + LoRA (unmerged), float64 end to end: the LLM's hidden_states[-1] is fed to the
    # resampler without rounding to f32 in between.
    r64 = copy.deepcopy(r).double()
    with torch.no_grad():
        pe, pooled = r64(a["hidden_lora_f64"], a["mask"])
    safetensors.torch.save_file(
        {"input_ids": a["ids"], "attention_mask": a["mask"],
         "prompt_embeds": f32(pe), "pooled": f32(pooled)},
        OUT / "chain.safetensors",
        metadata=case_metadata({"model": "models/gqa2_untied", "lora": "models/gqa2_untied/lora",
                                "resampler": "resampler/resampler.safetensors",
                                "hidden_layer": -1, "lengths": LENGTHS}))


# --------------------------------------------------------------------------------------------

def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> None:
    # Single thread: the CPU is shared, and it keeps reduction order fixed between runs.
    torch.set_num_threads(1)
    check(RESAMPLER_CFG.input_dim == SPECS[0].hidden, "resampler input_dim must match model a")

    # Wipe and recreate the folder, keeping the hand-written README.md.
    readme = OUT / "README.md"
    readme_text = readme.read_text() if readme.exists() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    if readme_text is not None:
        readme.write_text(readme_text)

    notes, chain_inputs = {}, None
    for s in SPECS:
        kept, notes[s.name] = make_model_fixtures(s)
        if s.name == "gqa2_untied":
            chain_inputs = kept
        print(f"{s.name}: {notes[s.name]}")
    r = make_resampler_fixtures()
    make_chain_fixture(r, chain_inputs)

    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name not in
                   ("MANIFEST.json",) and p != readme)
    manifest = {
        "generator": "tests/reference/make_fixtures.py",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "safetensors": safetensors.__version__, "numpy": numpy.__version__},
        "seed": SEED,
        "seed_offsets": {**{s.name: {"model": s.seed_offset, "lora": s.seed_offset + 10,
                                     "inputs": s.seed_offset + 20} for s in SPECS},
                         "resampler": SEED_OFF_RESAMPLER,
                         "resampler_case": SEED_OFF_RESAMPLER_CASE,
                         "not_a_zip": SEED_OFF_LEGACY_PTH},
        "compute_dtype": "float64", "store_dtype": "float32",
        "files": {str(p.relative_to(OUT)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                  for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(files)} files, {manifest['total_bytes']} bytes, to {OUT}")


if __name__ == "__main__":
    main()
