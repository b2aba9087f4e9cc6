"""Hugging Face config.json and generation_config.json <-> lima_jax's ModelConfig, per family
(LLaMA, Mistral, Qwen2, Qwen3), and the error every conversion raises on input it cannot use."""

import json
import os
from typing import Any, Mapping

from etils import epath

from lima_jax import checkpoint
from lima_jax import errors
from lima_jax import paths
from lima_jax import sampling
from lima_jax.model import ModelConfig

CONFIG_FILE = checkpoint.HF_CONFIG
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ARCHITECTURE = "LlamaForCausalLM"
# model_type -> the transformers class its config.json names.
ARCHITECTURES = {"llama": ARCHITECTURE, "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Config fields of mixture-of-experts variants; a dense converter must not drop the experts.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
               "moe_intermediate_size")
# Extra key of the model_config item: the source's special-token ids, for a later export.
SPECIAL_TOKENS_KEY = "hf_special_tokens"
# LIMA's decoding (Zhou et al., 2023, section 3): nucleus 0.9, temperature 0.7, penalty 1.2;
# one source of truth, lima_jax.sampling's defaults.
_LIMA_SAMPLING = sampling.SamplingConfig()
LIMA_GENERATION = {"do_sample": True, "top_p": _LIMA_SAMPLING.top_p,
                   "temperature": _LIMA_SAMPLING.temperature,
                   "repetition_penalty": _LIMA_SAMPLING.repetition_penalty}
DTYPES = ("float32", "bfloat16", "float16")


# Input the converter cannot use (the message names the file, field or tensor to fix): the one
# bad-input type, under the name the converter's callers have always caught.
ConversionError = errors.InputError


def read_json(path: epath.Path) -> dict:
  if not path.is_file():
    raise ConversionError(f"{path}: file not found")
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from e


def _rope_config(cfg: Mapping[str, Any], source: str) -> tuple[float, dict]:
  """(theta, scaling dict for ModelConfig) from 4.x keys (rope_theta, rope_scaling) or 5.x's
  rope_parameters."""
  params = cfg.get("rope_parameters")
  if isinstance(params, Mapping) and params:
    field = "rope_parameters"
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  else:
    field = "rope_scaling"
    theta = cfg.get("rope_theta", 10000.0)
    scaling = dict(cfg.get("rope_scaling") or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  needed = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")}
  if kind not in needed:
    raise ConversionError(f"{source}: {field}.rope_type={kind!r} is not supported "
                          f"(supported: {', '.join(needed)})")
  missing = [k for k in needed[kind] if k not in scaling]
  if missing:
    raise ConversionError(f"{source}: {field} with rope_type={kind!r} lacks {missing}")
  if kind == "default":
    return float(theta), {}
  return float(theta), {"rope_type": kind, **{k: scaling[k] for k in needed[kind]}}


def _sliding_window(cfg: Mapping[str, Any], model_type: str, n_layers: int, source: str) -> int:
  """The attention window every layer uses (0 = none), read as transformers reads each family.

  Mistral: `sliding_window` (null = none; absent = transformers' default 4096). Qwen2/Qwen3: the
  window applies only with `use_sliding_window`, and only to the `layer_types` entries that say
  "sliding_attention" (default: layers >= `max_window_layers`). LLaMA has none.
  """
  if model_type == "llama":
    return 0
  if model_type == "mistral":
    window = cfg.get("sliding_window", 4096)
    return int(window or 0)
  use = bool(cfg.get("use_sliding_window", False))
  window = cfg.get("sliding_window", 4096) if use else None
  layer_types = cfg.get("layer_types")
  if layer_types is None:
    first = int(cfg.get("max_window_layers", 28))
    layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                   for i in range(n_layers)]
  unknown = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
  if unknown:
    raise ConversionError(f"{source}: layer_types has {unknown}; lima_jax implements "
                          f"full_attention and sliding_attention")
  if len(layer_types) != n_layers:
    raise ConversionError(f"{source}: layer_types has {len(layer_types)} entries for "
                          f"num_hidden_layers={n_layers}")
  windows = {int(window) if t == "sliding_attention" and window else 0 for t in layer_types}
  if len(windows) > 1:
    raise ConversionError(
        f"{source}: a sliding window on some layers only (use_sliding_window=true, "
        f"sliding_window={window}, max_window_layers={cfg.get('max_window_layers')}, layer_types="
        f"{layer_types}); lima_jax applies one window to every layer or none")
  return windows.pop()


def hf_config_to_model_config(config_json: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
  """A ModelConfig from a Hugging Face LLaMA, Mistral, Qwen2 or Qwen3 config (a dict, a
  config.json, or its directory).

  Reads what transformers 4.x writes (`rope_theta`, `rope_scaling`, `torch_dtype`; LLaMA-1 files
  without `num_key_value_heads`) and what 5.x writes (`rope_parameters`, `dtype`, `layer_types`),
  with each family's defaults for absent fields, as transformers' config classes have them.
  Anything the model does not implement is refused, naming the field. `param_dtype` is the
  file's declared dtype; callers that know the stored tensors' dtype override it.
  """
  if isinstance(config_json, Mapping):
    cfg, source = dict(config_json), CONFIG_FILE
  else:
    path = paths.path(config_json)
    path = path / CONFIG_FILE if path.is_dir() else path
    cfg, source = read_json(path), str(path)
  model_type = cfg.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ConversionError(f"{source}: model_type={model_type!r}; lima_jax converts "
                          f"{', '.join(repr(t) for t in ARCHITECTURES)} models")
  architecture = ARCHITECTURES[model_type]
  archs = cfg.get("architectures") or []
  if archs and not any(a.lower() == architecture.lower() for a in archs):
    raise ConversionError(f"{source}: architectures={archs}; expected [{architecture!r}] for "
                          f"model_type={model_type!r}")
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")
  missing = [k for k in required if cfg.get(k) is None]
  if missing:
    raise ConversionError(f"{source}: missing field(s) {missing}")
  if cfg.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{source}: hidden_act={cfg['hidden_act']!r}; lima_jax implements 'silu'")
  moe = [k for k in _MOE_FIELDS if cfg.get(k)]
  if moe:
    raise ConversionError(f"{source}: {moe[0]}={cfg[moe[0]]!r}; lima_jax converts dense models, "
                          f"not mixture-of-experts")
  if cfg.get("mlp_bias"):
    raise ConversionError(f"{source}: mlp_bias=true; lima_jax's MLP has no biases")
  # Qwen2 always has q/k/v biases; LLaMA's and Qwen3's attention_bias would also bias o_proj,
  # which lima_jax does not implement; MistralForCausalLM has no biases and ignores the field.
  if model_type in ("llama", "qwen3") and cfg.get("attention_bias"):
    raise ConversionError(f"{source}: attention_bias=true; lima_jax implements q/k/v biases as "
                          f"Qwen2 has them, not the o_proj bias {architecture} adds with it")
  d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
  n_layers = int(cfg["num_hidden_layers"])
  head_dim = int(cfg.get("head_dim") or (128 if model_type == "qwen3" else 0))
  if not head_dim and d % heads:
    raise ConversionError(f"{source}: hidden_size={d} is not a multiple of "
                          f"num_attention_heads={heads} and head_dim is not given")
  if head_dim == d // heads and d % heads == 0:
    head_dim = 0
  theta, scaling = _rope_config(cfg, source)
  declared = cfg.get("dtype") or cfg.get("torch_dtype")
  max_len = {"llama": 2048, "mistral": 4096 * 32}.get(model_type, 32768)
  try:
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]), d_model=d, n_layers=n_layers,
        n_heads=heads, n_kv_heads=int(cfg.get("num_key_value_heads") or 0),
        head_dim=head_dim, mlp_dim=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=int(cfg.get("max_position_embeddings") or max_len),
        param_dtype=declared if declared in DTYPES else "float32",
        model_type=model_type, attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window(cfg, model_type, n_layers, source))
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e


def model_config_to_hf_config(config: ModelConfig, *, dtype: str,
                              special_tokens: Mapping[str, Any] | None = None) -> dict:
  """config.json for the config's transformers class (`LlamaForCausalLM`, `MistralForCausalLM`,
  `Qwen2ForCausalLM`, `Qwen3ForCausalLM`), with transformers-4.x keys (5.x reads them too).

  `vocab_size` is the real vocabulary (EOT included), not the padded one.
  """
  c, family = config, config.model_type
  features = {"attention_bias": c.attention_bias, "qk_norm": c.qk_norm,
              "sliding_window": bool(c.sliding_window)}
  has = {"llama": (), "mistral": ("sliding_window",), "qwen2": ("attention_bias", "sliding_window"),
         "qwen3": ("qk_norm", "sliding_window")}[family]
  wrong = [k for k, on in features.items() if on != (k in has) and (on or k != "sliding_window")]
  if wrong:
    raise ConversionError(f"model_config: model_type={family!r} with {wrong[0]}="
                          f"{getattr(c, wrong[0])!r}; {ARCHITECTURES[family]} cannot express it")
  hf = {
      "architectures": [ARCHITECTURES[family]], "model_type": family,
      "vocab_size": c.vocab_size, "hidden_size": c.d_model,
      "intermediate_size": c.mlp_dim, "num_hidden_layers": c.n_layers,
      "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
      "head_dim": c.dim_per_head, "hidden_act": "silu",
      "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "rope_scaling": dict(c.rope_scaling) or None,
      "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
  }
  if family == "llama":
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  elif family == "mistral":
    hf.update(sliding_window=c.sliding_window or None)
  else:
    kind = "sliding_attention" if c.sliding_window else "full_attention"
    hf.update(use_sliding_window=bool(c.sliding_window), sliding_window=c.sliding_window or None,
              max_window_layers=0 if c.sliding_window else c.n_layers,
              layer_types=[kind] * c.n_layers)
    if family == "qwen3":
      hf.update(attention_bias=False)
  for key, value in (special_tokens or {}).items():
    if value is not None:
      hf[key] = value
  return hf


def generation_config(tokens: Mapping[str, Any], eot_id: int | None = None,
                      max_length: int | None = None) -> dict:
  """LIMA's decoding for `model.generate` and vLLM; generation stops at EOS or EOT.

  `max_length` should be the model's own limit, `max_position_embeddings`: answers are at most
  LIMA's `max_new_tokens`, cut to it. The file sets `max_new_tokens`, not `max_length`: with
  `max_length` in it, every `generate(..., max_new_tokens=N)` call warns that both are set.
  """
  gen = dict(LIMA_GENERATION)
  if max_length is not None:
    gen["max_new_tokens"] = min(_LIMA_SAMPLING.max_new_tokens, int(max_length))
  eos = tokens.get("eos_token_id")
  eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
  if eot_id is not None and eot_id not in eos:
    eos.append(eot_id)
  if tokens.get("bos_token_id") is not None:
    gen["bos_token_id"] = tokens["bos_token_id"]
  if eos:
    gen["eos_token_id"] = eos
  if tokens.get("pad_token_id") is not None:
    gen["pad_token_id"] = tokens["pad_token_id"]
  return gen


def describe(config: ModelConfig) -> str:
  """One line about a model, for the tools' output."""
  return (f"{config.model_type}, {config.num_params() / 1e6:.1f}M params: {config.n_layers} layers, d_model "
          f"{config.d_model}, {config.n_heads} heads ({config.kv_heads} kv), mlp {config.mlp_dim}, "
          f"vocab {config.vocab_size}, {config.param_dtype}"
          + (f", window {config.sliding_window}" if config.sliding_window else ""))
