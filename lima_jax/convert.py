"""Hugging Face LLaMA, Mistral, Qwen2 and Qwen3 checkpoints <-> lima_jax parameters, streamed;
and `load_pretrained`.

The two layouts hold the same numbers in different shapes (see lima_jax.model for ours):

  model.embed_tokens.weight                  [V, D]      embed/embedding        [Vpad, D]
  model.layers.{i}.input_layernorm.weight    [D]         layers/attn_norm/scale [L, D]
  model.layers.{i}.self_attn.q_proj.weight   [H*Dh, D]   layers/attn/q_proj     [L, D, H, Dh]
  model.layers.{i}.self_attn.{k,v}_proj.weight [KV*Dh, D] layers/attn/{k,v}_proj [L, D, KV, Dh]
  model.layers.{i}.self_attn.o_proj.weight   [D, H*Dh]   layers/attn/o_proj     [L, H, Dh, D]
  model.layers.{i}.post_attention_layernorm.weight [D]   layers/mlp_norm/scale  [L, D]
  model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]      layers/mlp/{gate,up}_proj [L, D, F]
  model.layers.{i}.mlp.down_proj.weight      [D, F]      layers/mlp/down_proj   [L, F, D]
  model.norm.weight                          [D]         final_norm/scale       [D]
  lm_head.weight                             [V, D]      lm_head                [D, Vpad]
  model.layers.{i}.self_attn.q_proj.bias     [H*Dh]      layers/attn/q_bias     [L, H, Dh]  (Qwen2)
  model.layers.{i}.self_attn.{k,v}_proj.bias [KV*Dh]     layers/attn/{k,v}_bias [L, KV, Dh]
  model.layers.{i}.self_attn.{q,k}_norm.weight [Dh]      layers/attn/{q,k}_norm/scale [L, Dh] (Qwen3)

Every map is a transpose and a reshape (PyTorch's Linear stores [out, in]); Hugging Face already
keeps q/k in the half-split rotary layout the model uses, so no permutation is needed and the
round trip is bit-exact. Rows Vpad > V are zeros (their logits are masked anyway).

Nothing here holds a whole model on one host unless asked to: a block of a lima_jax parameter is
read from only the Hugging Face rows it needs (`ParamMap.read`), so
  * `hf_to_orbax` writes each stacked parameter one layer at a time (Orbax + TensorStore),
  * `orbax_to_hf` writes safetensors shards one layer at a time,
  * `load_hf_params` fills each device's shard straight from the files
    (`jax.make_array_from_callback`), which is how training starts from a 65B model.
"""

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lima_jax import checkpoint
from lima_jax import errors
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import safetensors_io
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
# Buffers some older checkpoints saved next to the weights; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class ConversionError(errors.InputError):
  """Input the converter cannot use; the message names the file, field or tensor to fix."""


# -- Hugging Face config.json <-> ModelConfig. ------------------------------------------------


def _read_json(path: epath.Path) -> dict:
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
    cfg, source = _read_json(path), str(path)
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


# -- One parameter's map between the layouts. -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamMap:
  """How one lima_jax parameter is made from Hugging Face tensors, and back.

  A layer's lima_jax array has the dimensions `col_shape + row_shape` when `transpose` (else
  `row_shape + col_shape`); the Hugging Face tensor is 2-D [prod(rows), prod(cols)] (1-D for
  norms). `hf_rows` < prod(row_shape) only for the vocabulary, whose padded rows are zeros.
  """
  path: tuple[str, ...]
  hf_name: str  # With "{i}" for the layer index when stacked.
  layers: int  # 0 = not stacked.
  row_shape: tuple[int, ...]
  col_shape: tuple[int, ...]
  transpose: bool
  hf_rows: int

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return self.col_shape + self.row_shape if self.transpose else self.row_shape + self.col_shape

  @property
  def shape(self) -> tuple[int, ...]:
    return ((self.layers,) if self.layers else ()) + self.layer_shape

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return (self.hf_rows,) + ((math.prod(self.col_shape),) if self.col_shape else ())

  @property
  def is_vocab(self) -> bool:
    return self.hf_rows != math.prod(self.row_shape)

  def hf_names(self) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(self.layers)] if self.layers else [self.hf_name]

  def read(self, read_rows: Callable[[int, int], np.ndarray], index: Sequence[slice],
           dtype: np.dtype, fill: "RowFill | None" = None, name: str = "") -> np.ndarray:
    """Block `index` (slices over `layer_shape`) of one layer, reading only the rows it needs.

    `read_rows(start, stop)` returns rows of the Hugging Face tensor. Rows past `hf_rows` are
    zeros, or `fill`'s vector where it covers them (a grown vocabulary).
    """
    index = tuple(index) + (slice(None),) * (len(self.layer_shape) - len(index))
    n_cols = len(self.col_shape)
    if self.transpose:
      col_index, row_index = index[:n_cols], index[n_cols:]
    else:
      row_index, col_index = index[:len(self.row_shape)], index[len(self.row_shape):]
    row_sel = [np.arange(n)[s] for n, s in zip(self.row_shape, row_index)]
    col_sel = [np.arange(n)[s] for n, s in zip(self.col_shape, col_index)]
    rows = np.ravel_multi_index(np.ix_(*row_sel), self.row_shape).reshape(-1)
    cols = np.ravel_multi_index(np.ix_(*col_sel), self.col_shape).reshape(-1) if col_sel else None
    real = rows < self.hf_rows
    block = None
    if real.any():
      wanted = rows[real]
      start, stop = int(wanted.min()), int(wanted.max()) + 1
      block = read_rows(start, stop)
      if not (wanted.size == stop - start and np.array_equal(wanted, np.arange(start, stop))):
        block = block[wanted - start]
      if cols is not None and not np.array_equal(cols, np.arange(block.shape[1])):
        block = block[:, cols]
      block = cast(block, dtype, name)
    if block is not None and real.all() and fill is None:
      out = block  # The common case: no padding rows, no copy.
    else:
      out = np.zeros((rows.size,) + (() if cols is None else (cols.size,)), dtype)
      if block is not None:
        out[real] = block
    del block
    if fill is not None:
      grown = (rows >= fill.start) & (rows < fill.stop)
      vector = fill.vector if cols is None else fill.vector[cols]
      out[grown] = cast(vector, dtype, name)
    sel_rows = tuple(s.size for s in row_sel)
    sel_cols = tuple(s.size for s in col_sel)
    if self.transpose:
      return transpose_2d(out.reshape(out.shape[0], -1)).reshape(sel_cols + sel_rows)
    return out.reshape(sel_rows + sel_cols)

  def to_hf(self, layer: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The Hugging Face tensor (or its rows [start, stop)) from a lima_jax array.

    `layer` is one whole layer, or, with `rows`, the block that `lima_index_of_rows` names.
    """
    start, stop = rows or (0, self.hf_rows)
    n_rows = stop - start if rows else math.prod(self.row_shape)
    n_cols = math.prod(self.col_shape)
    if not self.col_shape:
      return np.ascontiguousarray(layer.reshape(n_rows)[:stop - start])
    if self.transpose:
      return transpose_2d(layer.reshape(n_cols, n_rows)[:, :stop - start])
    return np.ascontiguousarray(layer.reshape(n_rows, n_cols)[:stop - start])

  def lima_index_of_rows(self, start: int, stop: int) -> tuple[slice, ...]:
    """The lima_jax block holding Hugging Face rows [start, stop) (one-row-axis maps only)."""
    if len(self.row_shape) != 1:
      raise ValueError(f"{'/'.join(self.path)}: rows span several axes")
    full = (slice(None),) * len(self.col_shape)
    return full + (slice(start, stop),) if self.transpose else (slice(start, stop),) + full


def transpose_2d(x: np.ndarray, rows_per_step: int = 16) -> np.ndarray:
  """`x.T` as a new C-ordered array, a band of rows at a time.

  NumPy's one-pass strided copy (`np.ascontiguousarray(x.T)`) misses the cache on nearly every
  element; copying bands of 16 source rows was about 5x faster for the 2-byte weights here
  (5632 x 2048 float16: 0.08 -> 0.4 GiB/s), and transposes are most of a conversion's work.
  """
  if x.ndim != 2:
    raise ValueError(f"transpose_2d takes a matrix, got shape {x.shape}")
  rows, cols = x.shape
  out = np.empty((cols, rows), x.dtype)
  for r in range(0, rows, rows_per_step):
    out[:, r:r + rows_per_step] = x[r:r + rows_per_step].T
  return out


@dataclasses.dataclass(frozen=True)
class RowFill:
  """Rows [start, stop) of a vocabulary tensor set to `vector` (new tokens, e.g. EOT)."""
  start: int
  stop: int
  vector: np.ndarray


def param_maps(config: ModelConfig) -> dict[tuple[str, ...], ParamMap]:
  """Every parameter of `config`'s model, keyed by its path in the parameter dict."""
  d, f, l = config.d_model, config.mlp_dim, config.n_layers
  h, kv, dh = config.n_heads, config.kv_heads, config.dim_per_head
  v, vpad = config.vocab_size, config.padded_vocab_size
  layer = "model.layers.{i}."
  maps = [
      ParamMap(("embed", "embedding"), "model.embed_tokens.weight", 0, (vpad,), (d,), False, v),
      ParamMap(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", l, (d,), (), False, d),
      ParamMap(("layers", "attn", "q_proj"), layer + "self_attn.q_proj.weight", l, (h, dh), (d,), True, h * dh),
      ParamMap(("layers", "attn", "k_proj"), layer + "self_attn.k_proj.weight", l, (kv, dh), (d,), True, kv * dh),
      ParamMap(("layers", "attn", "v_proj"), layer + "self_attn.v_proj.weight", l, (kv, dh), (d,), True, kv * dh),
      ParamMap(("layers", "attn", "o_proj"), layer + "self_attn.o_proj.weight", l, (d,), (h, dh), True, d),
  ]
  if config.attention_bias:
    maps += [ParamMap(("layers", "attn", f"{n}_bias"), layer + f"self_attn.{n}_proj.bias", l,
                      (heads, dh), (), False, heads * dh)
             for n, heads in (("q", h), ("k", kv), ("v", kv))]
  if config.qk_norm:
    maps += [ParamMap(("layers", "attn", f"{n}_norm", "scale"), layer + f"self_attn.{n}_norm.weight",
                      l, (dh,), (), False, dh) for n in "qk"]
  maps += [
      ParamMap(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", l, (f,), (d,), True, f),
      ParamMap(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", l, (f,), (d,), True, f),
      ParamMap(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", l, (d,), (f,), True, d),
      ParamMap(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", l, (d,), (), False, d),
      ParamMap(("final_norm", "scale"), "model.norm.weight", 0, (d,), (), False, d),
  ]
  if not config.tie_embeddings:
    maps.append(ParamMap(("lm_head",), "lm_head.weight", 0, (vpad,), (d,), True, v))
  return {m.path: m for m in maps}


def hf_tensor_order(maps: Mapping[tuple[str, ...], ParamMap]) -> list[tuple[str, ParamMap, int]]:
  """(name, map, layer) in transformers' state-dict order: embeddings, layer by layer, head."""
  stacked = [m for m in maps.values() if m.layers]
  layers = max((m.layers for m in stacked), default=0)
  order = [(m.hf_name, m, -1) for m in maps.values() if m.path == ("embed", "embedding")]
  for i in range(layers):
    order += [(m.hf_name.format(i=i), m, i) for m in stacked]
  order += [(m.hf_name, m, -1) for m in maps.values() if not m.layers and m.path != ("embed", "embedding")]
  return order


def cast(x: np.ndarray, dtype: np.dtype, name: str = "") -> np.ndarray:
  """`x` as `dtype`, refusing values the target cannot hold (finite values that overflow)."""
  dtype = np.dtype(dtype)
  if x.dtype == dtype:
    return x
  with np.errstate(over="ignore"):
    y = x.astype(dtype)
  limit = float(ml_dtypes.finfo(dtype).max)
  if limit < float(ml_dtypes.finfo(x.dtype).max) and (np.isfinite(x) & ~np.isfinite(y)).any():
    big = float(np.abs(x[np.isfinite(x)].astype(np.float64)).max())
    raise ConversionError(f"tensor {name}: values up to {big:g} overflow {dtype.name} "
                          f"(max {limit:g}); choose a wider --dtype")
  return y


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


# -- A Hugging Face model directory. -------------------------------------------------------------


class HFCheckpoint:
  """config.json + safetensors (sharded with model.safetensors.index.json, or single), checked.

  Construction reads only headers: every tensor the config implies must exist with the right
  shape and a floating dtype, and no unexpected tensor may be present, so a bad input fails
  before anything is written.
  """

  def __init__(self, directory: str | os.PathLike):
    self.dir = paths.path(directory)
    if not self.dir.is_dir():
      raise ConversionError(f"{self.dir}: no such directory")
    self.config_json = _read_json(self.dir / CONFIG_FILE)
    self.model_config = hf_config_to_model_config(self.dir / CONFIG_FILE)
    self._where = self._weight_map()
    self.maps = param_maps(self.model_config)
    self._check_tensors()
    stored = self.source_dtype(("embed", "embedding"))
    self.model_config = self.model_config.replace(
        param_dtype="float32" if stored == np.float64 else stored.name)

  def _weight_map(self) -> dict[str, safetensors_io.SafetensorsFile]:
    """tensor name -> the shard that holds it (headers read and checked)."""
    index_path, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
    if index_path.is_file():
      index = _read_json(index_path)
      weight_map = index.get("weight_map")
      if not isinstance(weight_map, Mapping) or not weight_map:
        raise ConversionError(f"{index_path}: no weight_map")
      files = {}
      for name in sorted(set(weight_map.values())):
        if not (self.dir / name).is_file():
          raise ConversionError(f"{index_path}: lists shard {name}, which is not in {self.dir}")
        files[name] = self._open(self.dir / name)
      where = {}
      for tensor, name in weight_map.items():
        if tensor not in files[name].tensors:
          raise ConversionError(f"{self.dir / name}: tensor {tensor} is missing (listed in {INDEX_FILE})")
        where[tensor] = files[name]
      return where
    if single.is_file():
      f = self._open(single)
      return dict.fromkeys(f.tensors, f)
    found = sorted(p.name for p in self.dir.iterdir())
    hint = (" PyTorch .bin weights are not read: load them in transformers and save with "
            "save_pretrained(dir, safe_serialization=True)." if any(n.endswith(".bin") for n in found) else "")
    raise ConversionError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found[:10]}).{hint}")

  @staticmethod
  def _open(path: epath.Path) -> safetensors_io.SafetensorsFile:
    try:
      return safetensors_io.SafetensorsFile(path)
    except ValueError as e:
      raise ConversionError(str(e)) from e

  def _check_tensors(self) -> None:
    c = self.model_config
    expected = {}
    for m in self.maps.values():
      for name in m.hf_names():
        expected[name] = m
    for name, m in expected.items():
      if name not in self._where:
        where = self.dir / (INDEX_FILE if (self.dir / INDEX_FILE).is_file() else SINGLE_FILE)
        raise ConversionError(f"{where}: tensor {name} is missing (config.json: num_hidden_layers="
                              f"{c.n_layers}, tie_word_embeddings={c.tie_embeddings})")
      f = self._where[name]
      info = f.tensors[name]
      if info.numpy_dtype is None:
        raise ConversionError(f"{f.path}: tensor {name} has dtype {info.dtype}; only float32, "
                              f"float16 and bfloat16 weights are supported (no quantized ones)")
      if info.shape != m.hf_shape:
        raise ConversionError(
            f"{f.path}: tensor {name} has shape {list(info.shape)} but {CONFIG_FILE} implies "
            f"{list(m.hf_shape)} (vocab_size={c.vocab_size}, hidden_size={c.d_model}, heads="
            f"{c.n_heads}, kv_heads={c.kv_heads}, head_dim={c.dim_per_head}, "
            f"intermediate_size={c.mlp_dim})")
    for m in self.maps.values():
      dtypes = {self._where[n].tensors[n].dtype for n in m.hf_names()}
      if len(dtypes) > 1:
        raise ConversionError(f"{self.dir}: the {m.hf_name} tensors mix dtypes {sorted(dtypes)}; "
                              f"pass --dtype to convert them to one")
    tied_head = "lm_head.weight" if c.tie_embeddings else None
    for name in self._where:
      if name not in expected and name != tied_head and not name.endswith(_IGNORED_SUFFIXES):
        raise ConversionError(f"{self._where[name].path}: unexpected tensor {name}; not a plain "
                              f"{ARCHITECTURES[c.model_type]} as {CONFIG_FILE} describes it")

  def source_dtype(self, path: tuple[str, ...]) -> np.dtype:
    name = self.maps[path].hf_names()[0]
    return self._where[name].tensors[name].numpy_dtype

  def row_reader(self, name: str) -> Callable[[int, int], np.ndarray]:
    f = self._where[name]
    return lambda start, stop: f.read_rows(name, start, stop)

  def read(self, path: tuple[str, ...], index: Sequence[slice], dtype=None,
           fill: RowFill | None = None, out_map: ParamMap | None = None) -> np.ndarray:
    """Block `index` (slices over the full lima_jax shape) of one parameter.

    `out_map` (default: the source's own map) may pad the vocabulary further (a grown one).
    """
    m = self.maps[path]
    target = out_map or m
    dtype = np.dtype(dtype or self.source_dtype(path))
    shape = target.shape
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    read_map = dataclasses.replace(target, hf_rows=m.hf_rows)
    if not target.layers:
      return read_map.read(self.row_reader(m.hf_name), index, dtype, fill, m.hf_name)
    layers = np.arange(target.layers)[index[0]]
    sub = index[1:]
    names = m.hf_names()
    first = read_map.read(self.row_reader(names[layers[0]]), sub, dtype, fill, names[layers[0]])
    if layers.size == 1:  # One layer a chunk, as the converter writes: no copy.
      return first[None]
    out = np.empty((layers.size,) + first.shape, dtype)
    out[0] = first
    for j, i in enumerate(layers[1:], start=1):
      out[j] = read_map.read(self.row_reader(names[i]), sub, dtype, fill, names[i])
    return out

  def row_mean(self, path: tuple[str, ...]) -> np.ndarray:
    """Mean over the vocabulary rows (float32), streamed: the initial row of a new token."""
    m = self.maps[path]
    read_rows = self.row_reader(m.hf_name)
    total = np.zeros(math.prod(m.col_shape), np.float64)
    row_bytes = math.prod(m.col_shape) * 4
    for start, stop in safetensors_io.iter_row_blocks(m.hf_rows, row_bytes):
      total += read_rows(start, stop).astype(np.float32).sum(axis=0, dtype=np.float64)
    return (total / m.hf_rows).astype(np.float32)

  def special_tokens(self) -> dict[str, Any]:
    return {k: self.config_json.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if self.config_json.get(k) is not None}


# -- Loading: parameters into shards, and `load_pretrained`. --------------------------------------


def load_hf_params(hf_dir: str | os.PathLike, shardings: Any = None,
                   dtype: str | None = "float32") -> tuple[dict, ModelConfig]:
  """(params, model_config) of a Hugging Face directory, each device's shard read from disk.

  `shardings` is a tree like the parameters' (e.g. `sharding.tree_shardings(...)` for
  `model.abstract_params(config)` of `hf_config_to_model_config(hf_dir)`); default: the first
  device. Each host reads only the rows its devices hold, one layer at a time, so no host ever
  holds the whole model. `dtype=None` keeps the files' dtypes. The vocabulary is the
  checkpoint's; grow it for EOT with `add_eot_row` (inside jit, with the new shardings).
  """
  hf = HFCheckpoint(hf_dir)
  config = hf.model_config
  if dtype is not None:
    config = config.replace(param_dtype=jnp.dtype(dtype).name)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params: dict = {}
  for path, m in hf.maps.items():
    target = default if shardings is None else _get_path(shardings, path)
    want = jnp.dtype(dtype) if dtype is not None else hf.source_dtype(path)
    array = jax.make_array_from_callback(
        m.shape, target, lambda index, path=path, want=want: hf.read(path, index, want))
    _set_path(params, path, array)
  return params, config


def load_pretrained(path: str | os.PathLike, dtype: str = "float32") -> model_lib.Transformer:
  """A ready model from a Hugging Face directory or a lima_jax checkpoint.

  Returns the `Transformer` (Flax NNX) bound to the parameters cast to `dtype`, computing in
  `dtype`: `model(tokens)` maps int32 ids [batch, seq] to float32 logits [batch, seq, vocab]
  (the real vocabulary, padding cut), and `model.config` is its ModelConfig. Wrap calls in
  `nnx.jit` (or `jax.jit` over `model_lib.bind`) for speed.
  """
  dtype = jnp.dtype(dtype).name
  if dtype not in DTYPES:
    raise ConversionError(f"dtype={dtype!r}; expected one of {DTYPES}")
  path = paths.path(path)
  if checkpoint.is_hf_dir(path):
    params, config = load_hf_params(path, dtype=dtype)
    return model_lib.bind(config.replace(dtype=dtype), params)
  try:
    ckpt = checkpoint.resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: neither a Hugging Face model directory (no {CONFIG_FILE}) "
                            f"nor a lima_jax checkpoint ({e})") from e
  config = checkpoint.read_model_config(ckpt).replace(param_dtype=dtype, dtype=dtype)
  if config.lora is not None:  # Adapters: merged into their base.
    from lima_jax import lora_io  # pylint: disable=g-import-not-at-top
    return model_lib.bind(config.replace(lora=None), lora_io.load_merged_params(ckpt, dtype=dtype))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        model_lib.abstract_params(config))
  return model_lib.bind(config, checkpoint.restore_params(ckpt, target))


def add_eot_row(params: Mapping, model_config: ModelConfig,
                new_vocab_size: int) -> tuple[dict, ModelConfig]:
  """Grows the embedding (and untied LM head) to `new_vocab_size` rows for new tokens (EOT).

  New rows start at the mean of the existing rows (a neutral token rather than noise); padded
  rows stay zero. Pure jnp, so it runs on abstract or sharded arrays inside `jit`.
  """
  old = model_config.vocab_size
  if new_vocab_size < old:
    raise ValueError(f"new_vocab_size={new_vocab_size} is smaller than the model's vocabulary ({old})")
  config = model_config.replace(vocab_size=new_vocab_size)
  if new_vocab_size == old:
    return dict(params), model_config
  padded = config.padded_vocab_size

  def grow(table, axis):
    t = jnp.moveaxis(table, axis, 0)
    mean = jnp.mean(t[:old].astype(jnp.float32), axis=0).astype(t.dtype)
    keep = min(t.shape[0], padded)
    t = jnp.pad(t[:keep], [(0, padded - keep)] + [(0, 0)] * (t.ndim - 1))
    rows = jnp.arange(padded).reshape((-1,) + (1,) * (t.ndim - 1))
    t = jnp.where(rows < old, t, jnp.where(rows < new_vocab_size, mean, jnp.zeros_like(mean)))
    return jnp.moveaxis(t, 0, axis)

  out = dict(params)
  out["embed"] = {**params["embed"], "embedding": grow(params["embed"]["embedding"], 0)}
  if "lm_head" in params:
    out["lm_head"] = grow(params["lm_head"], 1)
  return out, config


def set_rows_to_mean(params: Mapping, ids, mean_of: int) -> dict:
  """Rows `ids` of the embedding (and columns of an untied LM head) set to the mean of the
  first `mean_of` rows: a fresh token on a padding row of a model whose embedding is padded past
  its tokenizer. Pure jnp, so it runs on sharded arrays inside `jit`."""
  ids = jnp.asarray(ids, jnp.int32)

  def fill(table, axis):
    t = jnp.moveaxis(table, axis, 0)
    mean = jnp.mean(t[:mean_of].astype(jnp.float32), axis=0).astype(t.dtype)
    t = t.at[ids].set(jnp.broadcast_to(mean, (ids.shape[0],) + mean.shape))
    return jnp.moveaxis(t, 0, axis)

  out = dict(params)
  out["embed"] = {**params["embed"], "embedding": fill(params["embed"]["embedding"], 0)}
  if "lm_head" in params:
    out["lm_head"] = fill(params["lm_head"], 1)
  return out


# -- Orbax writing one block at a time. ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
  """A checkpoint leaf written chunk by chunk: `read(index)` gives the block at `index`.

  Chunks tile the array with `chunk_shape` (also the stored chunk shape), so the writer holds
  one chunk at a time however large the array is.
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  read: Callable[[tuple[slice, ...]], np.ndarray]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def chunks(self) -> Iterator[tuple[slice, ...]]:
    grid = [range(0, n, c) for n, c in zip(self.shape, self.chunk_shape)]
    for starts in np.ndindex(*[len(g) for g in grid]):
      yield tuple(slice(g[i], min(g[i] + c, n))
                  for g, i, c, n in zip(grid, starts, self.chunk_shape, self.shape))


def _release_free_memory() -> None:
  """Hands freed heap pages back to the OS (glibc), so chunk buffers do not pile up in RSS."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _load_libc():
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim  # pylint: disable=pointless-statement
    return libc
  except (OSError, AttributeError):
    return None


_LIBC = _load_libc()


@contextlib.contextmanager
def _quiet_absl():
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes a StreamedArray into the array format Orbax's NumPy/jax.Array handlers read.

  The TensorStore spec comes from Orbax itself (`get_json_tspec_write`), so the files are the
  ones Orbax would write for the array; only the data arrives chunk by chunk.
  """

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    # As Orbax's own handlers do, write in a commit future: it starts once Orbax signals that
    # the item's directory exists (writing sooner races with its creation).
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        self._write(values, infos, args), name="streamed_array")]

  async def _write(self, values, infos, args):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    jobs = []
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      use_ocdbt = bool(info.is_ocdbt_checkpoint)
      # Uncompressed: zstd cost as much CPU as the transposes (random bf16 shrank ~20%), and
      # Orbax restores either, since the array's metadata names its codec.
      info.use_compression = False
      spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=use_ocdbt, global_shape=value.shape, local_shape=value.chunk_shape,
          dtype=value.dtype, process_index=jax.process_index() if use_ocdbt else None, arg=arg)
      store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
      jobs += [(store, value, index) for index in value.chunks()]

    def read(job):
      _, value, index = job
      return np.asarray(value.read(index), value.dtype)

    # A two-stage pipeline over every chunk of every array: the next chunk is read (and
    # transposed) on a thread while TensorStore writes this one, so at most three chunks are
    # in memory and both cores work.
    ahead = asyncio.ensure_future(asyncio.to_thread(read, jobs[0])) if jobs else None
    try:
      for i, (store, _, index) in enumerate(jobs):
        block = await ahead
        ahead = (asyncio.ensure_future(asyncio.to_thread(read, jobs[i + 1]))
                 if i + 1 < len(jobs) else None)
        await store[index].write(block, can_reference_source_data_indefinitely=True)
        del block
        _release_free_memory()  # Else glibc keeps freed chunk buffers (+15% peak RSS here).
    finally:
      if ahead is not None and not ahead.done():  # A failed write: let the read finish quietly.
        with contextlib.suppress(Exception):
          await ahead
      _release_free_memory()


def save_streamed(path: epath.Path, params: Mapping, model_config_json: Mapping[str, Any],
                  tokenizer_blob: Mapping[str, Any] | None = None) -> None:
  """A lima_jax checkpoint (the layout of `checkpoint.save_model`) from StreamedArray leaves."""
  with _quiet_absl():  # It warns that the handler shares the "np.ndarray" type name: intended.
    ocp.type_handlers.register_type_handler(StreamedArray, _StreamedArrayHandler(), override=True)
  items = {checkpoint.PARAMS: ocp.args.PyTreeSave(params),
           checkpoint.MODEL_CONFIG: ocp.args.JsonSave(dict(model_config_json))}
  if tokenizer_blob is not None:
    items[checkpoint.TOKENIZER] = ocp.args.JsonSave(dict(tokenizer_blob))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(paths.absolute(path), ocp.args.Composite(**items))


def open_params(path) -> dict[tuple[str, ...], Any]:
  """Each parameter of a lima_jax checkpoint as an open TensorStore (lazy; slice, then read)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  params_dir = checkpoint.resolve(path) / checkpoint.PARAMS
  with _quiet_absl(), ocp.StandardCheckpointer() as ckptr:  # (no _CHECKPOINT_METADATA per item)
    meta = ckptr.metadata(params_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
  context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
  stores = {}
  for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in keypath)
    for zarr3 in (False, True):
      info = ocp.type_handlers.ParamInfo(name=".".join(keys), parent_dir=params_dir,
                                         is_ocdbt_checkpoint=use_ocdbt, use_zarr3=zarr3,
                                         ts_context=context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
      try:
        stores[keys] = ts.open(ts.Spec(spec), open=True, context=context).result()
        break
      except ValueError:
        if zarr3:
          raise
  return stores


# -- The two conversions. -------------------------------------------------------------------------

# Orbax's mark of a finished save where it cannot rename (object stores): written last.
ORBAX_COMMIT_FILE = "commit_success.txt"


@contextlib.contextmanager
def _staged(destination, **kwargs):
  """`paths.staged_directory`, an existing destination reported as a ConversionError."""
  with contextlib.ExitStack() as stack:
    try:
      out = stack.enter_context(paths.staged_directory(destination, **kwargs))
    except FileExistsError as e:
      raise ConversionError(str(e)) from None
    yield out


def _load_tokenizer_blob(hf_dir: epath.Path, eot: str, strict: bool) -> dict | None:
  """The directory's tokenizer as a checkpoint blob; None if it has none.

  A tokenizer that fails to load is an error when `strict` (the vocabulary size depends on it),
  else a warning: the weights convert regardless.
  """
  if not any((hf_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
    return None
  from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  try:
    return tokenizer_lib.load_tokenizer(hf_dir, eot=eot).to_blob()
  except (ValueError, OSError) as e:
    if strict:
      raise ConversionError(f"{hf_dir}: tokenizer: {e}") from e
    print(f"warning: {hf_dir}: tokenizer not stored ({e})", file=sys.stderr)
    return None


def _chunk_shape(m: ParamMap, itemsize: int, block_bytes: int = 8 * 2**20) -> tuple[int, ...]:
  """One layer of a stacked parameter; row blocks of a vocabulary table; else whole."""
  if m.layers:
    return (1,) + m.layer_shape
  if len(m.row_shape) == 1 and m.col_shape:
    step = max(1, block_bytes // (math.prod(m.col_shape) * itemsize))
    step = min(m.row_shape[0], max(128, step // 128 * 128))
    return m.col_shape + (step,) if m.transpose else (step,) + m.col_shape
  return m.layer_shape


def hf_to_orbax(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, *, dtype: str | None = None,
                eot: str | None = None, add_eot: bool = False) -> ModelConfig:
  """Converts a Hugging Face LLaMA, Mistral or Qwen directory into a lima_jax checkpoint, by layer.

  `dtype=None` keeps each tensor's dtype (bit-exact). The tokenizer, if the directory has one,
  is stored in the checkpoint with `eot` as its EOT text; `add_eot` also grows the embedding and
  LM head to the tokenizer's vocabulary (EOT included), new rows at the mean of the old ones.
  """
  hf_dir = paths.path(hf_dir)
  hf = HFCheckpoint(hf_dir)
  config = hf.model_config
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r}; expected one of {DTYPES}")
  if dtype is None:
    for path in hf.maps:
      if hf.source_dtype(path) == np.float64:
        raise ConversionError(f"{hf_dir}: {hf.maps[path].hf_name} is float64; pass --dtype "
                              f"float32 (or bfloat16) to store it")
  from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  eot_text = eot or tokenizer_lib.DEFAULT_EOT
  blob = _load_tokenizer_blob(hf_dir, eot_text, strict=add_eot)
  new_vocab = config.vocab_size
  if add_eot:
    tok_vocab = tokenizer_lib.load_tokenizer_from_blob(blob).vocab_size if blob else 0
    new_vocab = max(config.vocab_size + (0 if blob else 1), tok_vocab)
  out_config = config.replace(vocab_size=new_vocab)
  out_maps = param_maps(out_config)
  fills = {}
  if new_vocab > config.vocab_size:
    for path in out_maps:
      if out_maps[path].is_vocab:
        fills[path] = RowFill(config.vocab_size, new_vocab, hf.row_mean(path))
  elif add_eot and blob:  # A spare row for EOT already (Qwen): it starts at the mean likewise.
    tok = tokenizer_lib.load_tokenizer_from_blob(blob)
    if not tok.eot_declared and tok.eot_id < config.vocab_size:
      for path in out_maps:
        if out_maps[path].is_vocab:
          fills[path] = RowFill(tok.eot_id, tok.eot_id + 1, hf.row_mean(path))
  tree: dict = {}
  for path, m in out_maps.items():
    want = jnp.dtype(dtype) if dtype else hf.source_dtype(path)
    _set_path(tree, path, StreamedArray(
        m.shape, want, _chunk_shape(m, want.itemsize),
        lambda index, path=path, m=m, want=want: hf.read(path, index, want, fills.get(path), m)))
  if dtype:
    out_config = out_config.replace(param_dtype=dtype)
  config_json = {**out_config.to_dict(), SPECIAL_TOKENS_KEY: hf.special_tokens()}
  with _staged(ckpt_dir, fresh=True, complete_when=ORBAX_COMMIT_FILE) as out:
    save_streamed(out, tree, config_json, blob)
  return out_config


def _read_config_json(ckpt: epath.Path) -> dict:
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(paths.absolute(ckpt), ocp.args.Composite(
        **{checkpoint.MODEL_CONFIG: ocp.args.JsonRestore()}))
  return dict(restored[checkpoint.MODEL_CONFIG])


def orbax_to_hf(ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike, *,
                max_shard_size: str | int = "5GB", dtype: str | None = None) -> list[str]:
  """Exports a lima_jax checkpoint (or a workdir's newest) as a Hugging Face directory of its family.

  Writes safetensors shards of at most `max_shard_size` (with model.safetensors.index.json when
  there are several), config.json, generation_config.json (LIMA's sampling) and, when the
  checkpoint carries one, the tokenizer (with LIMA's chat template). A few layer tensors are in
  memory at a time (one being written, two read ahead on a thread). `dtype=None` keeps
  the stored dtypes. Returns the written file names.
  """
  try:
    ckpt = checkpoint.resolve(ckpt_dir)
  except FileNotFoundError as e:
    raise ConversionError(str(e)) from e
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r}; expected one of {DTYPES}")
  try:
    max_bytes = safetensors_io.parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
  except ValueError as e:
    raise ConversionError(f"--max_shard_size: {e}") from e
  config_json = _read_config_json(ckpt)
  config = ModelConfig.from_dict(config_json)
  blob = checkpoint.read_tokenizer_blob(ckpt)
  if config.lora is not None:  # Adapters: merged into their base, one layer at a time.
    from lima_jax import lora_io  # pylint: disable=g-import-not-at-top
    stores, config = lora_io.merged_stores(ckpt)
  else:
    stores = open_params(ckpt)
  maps = param_maps(config)
  if set(stores) != set(maps):
    missing = sorted("/".join(p) for p in set(maps) - set(stores))
    extra = sorted("/".join(p) for p in set(stores) - set(maps))
    raise ConversionError(f"{ckpt}: parameters do not match its model_config (missing {missing}, "
                          f"unexpected {extra})")
  for path, m in maps.items():
    if tuple(stores[path].shape) != m.shape:
      raise ConversionError(f"{ckpt}: parameter {'/'.join(path)} has shape "
                            f"{list(stores[path].shape)}, model_config implies {list(m.shape)}")

  def stored_dtype(path):
    return np.dtype(stores[path].dtype.numpy_dtype)

  def blocks(name, m, layer):
    want = jnp.dtype(dtype) if dtype else stored_dtype(m.path)
    store = stores[m.path]
    if layer >= 0:
      yield cast(m.to_hf(store[layer].read().result()), want, name)
      return
    row_bytes = math.prod(m.col_shape or (1,)) * stored_dtype(m.path).itemsize
    for start, stop in safetensors_io.iter_row_blocks(m.hf_rows, row_bytes, 16 * 2**20):
      block = store[m.lima_index_of_rows(start, stop)].read().result()
      yield cast(m.to_hf(block, (start, stop)), want, name)

  sources = [safetensors_io.TensorSource(
      name, jnp.dtype(dtype) if dtype else stored_dtype(m.path), m.hf_shape,
      lambda name=name, m=m, layer=layer: blocks(name, m, layer))
             for name, m, layer in hf_tensor_order(maps)]
  shards = safetensors_io.plan_shards(sources, max_bytes)
  names = safetensors_io.shard_names(len(shards))
  written = []
  out_dtype = jnp.dtype(sources[0].dtype).name
  tokens = dict(config_json.get(SPECIAL_TOKENS_KEY) or {})
  tokenizer, eot_id = None, None
  if blob is not None:
    from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tokenizer = tokenizer_lib.load_tokenizer_from_blob(blob)
    tokens = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
              "pad_token_id": tokenizer.pad_id}
    eot_id = tokenizer.eot_id
    if eot_id >= config.vocab_size:  # A base model converted before its EOT row was added.
      print(f"warning: {ckpt}: the model has {config.vocab_size} rows, no row for EOT (id "
            f"{eot_id}); generation_config.json stops at EOS only", file=sys.stderr)
      eot_id = None
  # config.json goes last: on GCS (no rename) it is what marks the directory complete, and every
  # reader of a Hugging Face directory (ours, transformers) requires it.
  with _staged(hf_dir, complete_when=CONFIG_FILE) as out:
    for shard, name in zip(shards, names):
      safetensors_io.write_file(out / name, shard)
      written.append(name)
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(s.nbytes for s in sources)},
               "weight_map": {s.name: n for shard, n in zip(shards, names) for s in shard}}
      (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
      written.append(INDEX_FILE)
    (out / GENERATION_CONFIG_FILE).write_text(
        json.dumps(generation_config(tokens, eot_id, config.max_seq_len), indent=2) + "\n")
    written.append(GENERATION_CONFIG_FILE)
    if tokenizer is not None:
      written += [p.name for p in tokenizer.save_files(out)]
    hf_config = model_config_to_hf_config(config, dtype=out_dtype, special_tokens=tokens)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    written.append(CONFIG_FILE)
  return written


def generation_config(tokens: Mapping[str, Any], eot_id: int | None = None,
                      max_length: int | None = None) -> dict:
  """LIMA's decoding for `model.generate` and vLLM; generation stops at EOS or EOT.

  `max_length` (prompt + answer) should be the model's own limit, `max_position_embeddings`.
  """
  gen = dict(LIMA_GENERATION)
  if max_length is not None:
    gen["max_length"] = int(max_length)
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

