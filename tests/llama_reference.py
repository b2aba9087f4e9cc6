"""Tiny random Hugging Face LLaMA models, saved as transformers 4.x or 5.x would, for reference tests.

Nothing is downloaded: each model is `LlamaForCausalLM(LlamaConfig(...))` with a fixed torch seed,
saved with `save_pretrained(..., safe_serialization=True)`. transformers 5 writes config.json
with `rope_parameters` and `dtype`; `as_transformers4_config` rewrites it the way 4.x did
(`rope_theta`, `rope_scaling`, `torch_dtype`; LLaMA-1 files without `num_key_value_heads`).
"""

import copy
import json
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position

transformers.logging.set_verbosity_error()

_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               max_position_embeddings=256, rms_norm_eps=1e-6)

# Three generations of LLaMA, shrunk: what changes between them is what the converter must read.
STYLES = {
    # LLaMA-1: multi-head attention; its config.json predates num_key_value_heads.
    "llama1": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # LLaMA-2: grouped-query attention (the 70B shape).
    "llama2": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                   rms_norm_eps=1e-5),
    # LLaMA-3: GQA, theta 500000, the "llama3" frequency scaling, tied embeddings (as 3.2 1B/3B).
    "llama3": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                   rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=16)),
}


def make_model(style: str, seed: int = 0) -> transformers.LlamaForCausalLM:
  fields = {**_COMMON, **STYLES[style]}
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
  with torch.no_grad():  # Non-trivial norm scales, so a norm mix-up shows.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def as_transformers4_config(config: dict, *, llama1: bool = False) -> dict:
  """config.json as transformers 4.x wrote it (from the dict 5.x writes)."""
  config = dict(config)
  rope = dict(config.pop("rope_parameters", None) or {})
  config["rope_theta"] = rope.pop("rope_theta", 10000.0)
  config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
  config["torch_dtype"] = config.pop("dtype", None) or "float32"
  config["transformers_version"] = "4.44.0"
  if llama1:
    config.pop("num_key_value_heads", None)
    config.pop("head_dim", None)
  return config


def save_model(model, directory, *, keys: str = "5.x", dtype=None,
               max_shard_size: str | None = None) -> pathlib.Path:
  """Saves `model` (cast to `dtype`) with config.json written by transformers `keys` ("4.x"/"5.x")."""
  directory = pathlib.Path(directory)
  if dtype is not None:
    model = copy.deepcopy(model).to(dtype)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, safe_serialization=True, **kwargs)
  if keys == "4.x":
    path = directory / "config.json"
    llama1 = model.config.num_key_value_heads == model.config.num_attention_heads
    path.write_text(json.dumps(as_transformers4_config(json.loads(path.read_text()),
                                                       llama1=llama1), indent=2))
  return directory


def rounded(model, dtype):
  """A float32 copy of `model` whose weights are rounded to `dtype`: the reference for a
  checkpoint saved in `dtype` (casting the module itself would round its rotary buffers too)."""
  model = copy.deepcopy(model)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.to(dtype).float())
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  """float32 logits of the reference model (a float32 one: see `rounded`)."""
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def tokens(batch: int = 2, length: int = 24, vocab: int = 300, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def random_params(config, seed: int = 1) -> dict:
  """Random lima_jax parameters drawn with NumPy (nothing to compile): std 0.02, norm scales
  near 1, padded vocabulary rows zero."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lima_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(path, a):
    keys = tuple(p.key for p in path)
    if model_lib.is_norm_scale(keys):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(a.shape), a.dtype)
    x = 0.02 * rng.standard_normal(a.shape)
    if keys == ("embed", "embedding"):
      x[config.vocab_size:] = 0
    elif keys == ("lm_head",):
      x[:, config.vocab_size:] = 0
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(draw, model_lib.abstract_params(config))
