"""LoRA adapters as Hugging Face PEFT directories: adapter_config.json + adapter_model.safetensors,
which `peft.PeftModel.from_pretrained` loads onto the base (with the EOT row, see
docs/training.md). Opening a LoRA checkpoint (or reading it merged into its base) is `lima_jax.source`.
"""

import json
from typing import Mapping

import numpy as np

from lima_jax import checkpoint
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import safetensors_io
from lima_jax import source as source_lib
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.convert.hf_config import ConversionError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Hugging Face module paths of the adapted projections.
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def peft_tensors(model_config: model_lib.ModelConfig, trainable: Mapping) -> dict[str, np.ndarray]:
  """PEFT's state dict of the adapters: lora_A.weight [r, in] and lora_B.weight [out, r] per
  layer and projection, and each trained table's rows (`token_adapter.trainable_tokens_delta`,
  which PEFT writes over the base rows at `trainable_token_indices`)."""
  r = model_config.lora.rank
  out = {}
  for module, sub in trainable.get("layers", {}).items():
    for target, ab in sub["lora"].items():
      a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
      for i in range(model_config.n_layers):
        prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[module]}.{target}"
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  rows = trainable.get("rows", {})
  if "embedding" in rows:
    out["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = (
        np.ascontiguousarray(np.asarray(rows["embedding"], np.float32)))
  if "lm_head" in rows:
    out["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] = (
        np.ascontiguousarray(np.asarray(rows["lm_head"], np.float32).T))
  return out


def peft_config(model_config: model_lib.ModelConfig, base_name: str | None) -> dict:
  """adapter_config.json: a LoraConfig that computes what lima_jax's adapters compute."""
  lc = model_config.lora
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
      "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
      "target_modules": list(lc.targets), "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None,
  }
  if lc.token_ids:
    ids = list(lc.token_ids)
    config["trainable_token_indices"] = (
        {"embed_tokens": ids} if model_config.tie_embeddings else {"embed_tokens": ids, "lm_head": ids})
  return config


def save_peft(ckpt_dir, peft_dir) -> list[str]:
  """Writes a LoRA checkpoint (or a workdir's newest) as a Hugging Face PEFT adapter directory.

  Files: adapter_config.json, adapter_model.safetensors (float32, as PEFT keeps adapters) and,
  when the checkpoint carries one, the tokenizer (with EOT). Atomic: a temporary directory
  renamed at the end. Returns the written file names.
  """
  try:
    opened = source_lib.open_model(ckpt_dir)
  except FileNotFoundError as e:
    raise ConversionError(f"{ckpt_dir}: {e}") from e
  ckpt = opened.path
  if opened.kind != source_lib.LORA:
    raise ConversionError(
        f"{ckpt}: not a LoRA checkpoint (its model_config has no lora section); export a full "
        f"model with orbax-to-hf instead")
  config = opened.model_config.replace(lora=opened.stored_lora)
  tensors = peft_tensors(config, checkpoint.restore_params(ckpt))
  base = config.lora.base
  base_name = base if base and checkpoint.is_hf_dir(base) else None
  blob = checkpoint.read_tokenizer_blob(ckpt)
  written = []
  # adapter_config.json goes last: on GCS (no rename) it is what marks the directory complete.
  with paths.staged_directory(peft_dir, complete_when=ADAPTER_CONFIG) as tmp:
    sources = [safetensors_io.TensorSource(name, np.dtype(np.float32), tuple(x.shape),
                                           lambda x=x: [x])
               for name, x in sorted(tensors.items())]
    safetensors_io.write_file(tmp / ADAPTER_WEIGHTS, sources)
    written.append(ADAPTER_WEIGHTS)
    if blob is not None:
      written += [p.name for p in tokenizer_lib.load_tokenizer_from_blob(blob).save_files(tmp)]
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config, base_name), indent=2) + "\n")
    written.append(ADAPTER_CONFIG)
  return written
