"""PEFT interop: the LoRA our trainer saves loads in Python `peft` and gives the hidden states
our loader gives.

Usage (venv from tests/reference/requirements.txt):
    cargo run --features dev --bin qwenclip-dev -- tiny --out /tmp/qc   # the seeded tiny Qwen3 (seed 0)
    python tests/reference/peft_interop.py /tmp/qc/model tests/fixtures/interop

Loads the tiny model with `transformers`, the trainer-written LoRA in
tests/fixtures/interop/ with `PeftModel.from_pretrained`, checks every LoRA tensor was taken
from the file (no missing or unexpected keys), and writes `peft_hidden.safetensors` (input ids,
attention mask, `hidden_states[-1]` with the LoRA applied, computed in float64) into the same
folder. `tests/interop.rs` compares our loader against that file.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

model_dir, fixture = Path(sys.argv[1]), Path(sys.argv[2])
# PEFT names the tensors after the wrapped module: our files use the names it writes for a
# causal LM (`base_model.model.model.layers...`), the model class users load Qwen3 with.
base = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, fixture)
model = model.double().eval()

# Every tensor of the file must be the one PEFT uses (same name after its own renaming).
saved = load_file(fixture / "adapter_model.safetensors")
state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
assert len(state) == len(saved), f"PEFT holds {len(state)} LoRA tensors, the file {len(saved)}"
for name, t in saved.items():
    assert name in state, f"{name} was not loaded by PEFT"
    assert torch.equal(state[name].float(), t.float()), f"{name} differs after loading"

torch.manual_seed(0)
ids = torch.randint(0, 151_000, (2, 9))
mask = torch.ones_like(ids)
mask[1, 5:] = 0
with torch.no_grad():
    h_lora = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    with model.disable_adapter():
        h_base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
assert (h_lora - h_base).abs().max() > 1e-3, "the LoRA has no effect: was it loaded?"
weights = (model_dir / "model.safetensors").read_bytes()
save_file(
    {"input_ids": ids, "attention_mask": mask, "hidden_last_lora": h_lora.float().contiguous()},
    fixture / "peft_hidden.safetensors",
    metadata={"model_sha256": hashlib.sha256(weights).hexdigest()},
)
print(json.dumps({"lora_tensors": len(saved), "max_lora_effect": float((h_lora - h_base).abs().max())}))
