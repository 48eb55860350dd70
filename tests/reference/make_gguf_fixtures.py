"""Generate the GGUF fixtures under tests/fixtures/gguf/ (see that folder's README.md).

qwenclip writes GGUF files with candle; these are written by an independent tool, the `gguf`
Python package (llama.cpp's own writer, `gguf-py`), from the parity fixture model
tests/fixtures/parity/models/gqa2_untied, with llama.cpp's tensor names and metadata keys:

  * gqa2_untied-f32.gguf   every tensor F32, no tokenizer: must reproduce the committed
                           transformers references in tests/fixtures/parity/cases/.
  * gqa2_untied-q8_0.gguf  projections Q8_0 (quantized by gguf-py's numpy quantizer) except
                           attn_v in F16, token_embd / output Q8_0, norms F32, and a byte-level
                           BPE tokenizer (the first 1020 Qwen tokens + 4 added tokens).
  * reference.safetensors  transformers' own reading of the Q8_0 file (`from_pretrained(...,
                           gguf_file=...)`, which dequantizes with gguf-py): hidden states in
                           float64 (stored f32), and the ids its GGUF tokenizer gives for
                           PROMPTS.

Run:  python tests/reference/make_gguf_fixtures.py   (needs tests/reference/requirements.txt)
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import safetensors.torch
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import check, f32, hidden_states, max_abs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "gguf"
MODEL = ROOT / "tests" / "fixtures" / "parity" / "models" / "gqa2_untied"
CASE = ROOT / "tests" / "fixtures" / "parity" / "cases" / "gqa2_untied.safetensors"
QWEN_TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "qwen_tokenizer.json"

N_NORMAL = 1020  # byte alphabet (256) + the first 764 merges: a closed BPE vocabulary
ADDED = [("<|endoftext|>", TokenType.CONTROL), ("<|im_start|>", TokenType.CONTROL),
         ("<think>", TokenType.USER_DEFINED), ("</think>", TokenType.USER_DEFINED)]
# transformers' GGUF Qwen2 tokenizer knows only <|endoftext|>, <|im_start|>, <|im_end|> as
# special tokens (it ignores token_type), so the prompts avoid <think>.
PROMPTS = [
    "a red cube left of a blue sphere",
    "",
    "Hello, World! 123 + 4567 = 4690",
    "line one\nline two\n\n  indented\ttab",
    "naïve café, 東京 and emoji 🙂",
    "<|im_start|>user prompt<|endoftext|>",
    "it's what we'll do, they've said",
]

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{LAYER[rest.removesuffix('.weight')]}.weight"


def tokenizer_vocab() -> tuple[list[str], list[int], list[str]]:
    tok = json.loads(QWEN_TOKENIZER.read_text())
    inv = {i: s for s, i in tok["model"]["vocab"].items()}
    tokens = [inv[i] for i in range(N_NORMAL)]
    kept = set(tokens)
    merges = []
    for m in tok["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:
            merges.append(f"{a} {b}")
    check(len(merges) == N_NORMAL - 256, f"{len(merges)} merges for {N_NORMAL} tokens")
    types = [int(TokenType.NORMAL)] * N_NORMAL
    for text, ty in ADDED:
        tokens.append(text)
        types.append(int(ty))
    return tokens, types, merges


def write(path: Path, weights: dict[str, np.ndarray], cfg: dict, quantized: bool) -> None:
    w = GGUFWriter(str(path), arch="qwen3")
    w.add_name("gqa2_untied")
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    if quantized:
        tokens, types, merges = tokenizer_vocab()
        check(len(tokens) == cfg["vocab_size"], "tokenizer size != vocab_size")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(N_NORMAL)
        w.add_pad_token_id(N_NORMAL)
        w.add_add_bos_token(False)
    for hf, arr in weights.items():
        name = gguf_name(hf)
        arr = arr.astype(np.float32)
        if not quantized or arr.ndim == 1:
            w.add_tensor(name, arr)
        elif name.endswith("attn_v.weight"):
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_roundtrip(path: Path, weights: dict[str, np.ndarray]) -> float:
    """gguf-py reads back what it wrote; returns the largest dequantization error."""
    r = gguf.GGUFReader(str(path))
    worst = 0.0
    for t in r.tensors:
        hf = next(k for k in weights if gguf_name(k) == t.name)
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weights[hf].shape)
        worst = max(worst, float(np.abs(deq - weights[hf]).max()))
    return worst


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> None:
    torch.set_num_threads(1)
    readme = OUT / "README.md"
    readme_text = readme.read_text() if readme.exists() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    if readme_text is not None:
        readme.write_text(readme_text)

    cfg = json.loads((MODEL / "config.json").read_text())
    weights = load_file(MODEL / "model.safetensors")
    f32_path, q8_path = OUT / "gqa2_untied-f32.gguf", OUT / "gqa2_untied-q8_0.gguf"
    write(f32_path, weights, cfg, quantized=False)
    write(q8_path, weights, cfg, quantized=True)
    check(check_roundtrip(f32_path, weights) == 0.0, "F32 GGUF does not round-trip")
    q8_err = check_roundtrip(q8_path, weights)
    check(0 < q8_err < 1e-2, f"Q8_0 dequantization error {q8_err}")

    case = safetensors.torch.load_file(CASE)
    ids, mask = case["input_ids"], case["attention_mask"]

    # transformers reads both files (dequantizing with gguf-py) into its own Qwen3. Its GGUF
    # config mapping for qwen3 ignores `attention.key_length` (head_dim falls back to
    # Qwen3Config's default 128, right for the released models but not for this one), so the
    # architecture comes from the parity config.json; the weights come from the GGUF.
    hf_cfg = AutoConfig.from_pretrained(MODEL)
    hf_cfg._attn_implementation = "eager"

    def load(path: Path) -> Qwen3ForCausalLM:
        m = Qwen3ForCausalLM.from_pretrained(OUT, gguf_file=path.name, config=hf_cfg,
                                             dtype=torch.float32, attn_implementation="eager")
        return m.double().eval()

    f32_model = load(f32_path)
    hs_f32 = hidden_states(f32_model, ids, mask)
    d_f32 = max_abs(hs_f32[-1], case["hidden_last"])
    # The F32 file holds exactly the parity weights: transformers must reproduce its own
    # committed reference (to float32 storage rounding).
    check(d_f32 < 1e-5, f"F32 GGUF vs parity reference: {d_f32}")
    q8_model = load(q8_path)
    hs_q8 = hidden_states(q8_model, ids, mask)
    valid = mask.bool()
    q8_vs_f32 = max_abs(hs_q8[-1][valid], case["hidden_last"][valid])
    check(1e-4 < q8_vs_f32 < 0.5, f"Q8_0 vs f32 hidden states: {q8_vs_f32}")

    tok = AutoTokenizer.from_pretrained(OUT, gguf_file=q8_path.name)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    check(prompt_ids[5][0] == N_NORMAL + 1 and prompt_ids[5][-1] == N_NORMAL,
          f"special tokens not split out: {prompt_ids[5]}")

    tensors = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "hidden_last_q8_0": f32(hs_q8[-1]),
        "hidden_penult_q8_0": f32(hs_q8[-2]),
    }
    for i, p in enumerate(prompt_ids):
        tensors[f"prompt_ids_{i}"] = torch.tensor(p, dtype=torch.int64).reshape(1, len(p))
    info = {"prompts": PROMPTS, "model": "gqa2_untied-q8_0.gguf", "compute": "float64",
            "store": "float32", "note": "prompt_ids_{i} are shaped [1, n]; the empty prompt "
            "is [1, 0]"}
    safetensors.torch.save_file(tensors, OUT / "reference.safetensors",
                                metadata={"qwenclip.case": json.dumps(info, sort_keys=True)})

    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json"
                   and p != readme)
    manifest = {
        "generator": "tests/reference/make_gguf_fixtures.py",
        "versions": {"python": platform.python_version(), "gguf": _version("gguf"),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "checks": {"f32_gguf_vs_parity_reference": d_f32, "q8_0_dequant_max_error": q8_err,
                   "q8_0_vs_f32_hidden_last": q8_vs_f32},
        "files": {str(p.relative_to(OUT)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                  for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest["checks"]))
    print(f"wrote {len(files)} files, {manifest['total_bytes']} bytes, to {OUT}")


def _version(pkg: str) -> str:
    import importlib.metadata
    return importlib.metadata.version(pkg)


if __name__ == "__main__":
    main()
