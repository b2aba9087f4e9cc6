"""The LLaMA decoder family in Flax NNX, numerically matching Hugging Face.

One config covers LLaMA-1/2/3, Mistral, Qwen2/2.5 and Qwen3 (`model_type`): multi-head,
grouped-query and multi-query attention, rotary embeddings with LLaMA-3 scaling, SwiGLU, tied or
untied embeddings, a vocabulary padded for even sharding, and the families' differences: q/k/v
biases (Qwen2), RMSNorm over each head's queries and keys before rotary (Qwen3) and a sliding
attention window (Mistral v0.1).
Decoder layers keep their parameters stacked on a leading `layers` axis, so the same checkpoint
runs under `jax.lax.scan` (one compiled layer) or unrolled. LIMA's residual dropout rate grows
linearly with depth and is passed to the scanned layer as data.

Parameters cross module boundaries as the plain nested dict of `nnx.to_pure_dict(nnx.state(m))`:

  embed/embedding        [vocab_padded, d_model]
  layers/attn_norm/scale [L, d_model]
  layers/attn/{q,k,v}_proj [L, d_model, heads|kv_heads, head_dim]
  layers/attn/o_proj     [L, heads, head_dim, d_model]
  layers/attn/{q,k,v}_bias [L, heads|kv_heads, head_dim]   (only with attention_bias)
  layers/attn/{q,k}_norm/scale [L, head_dim]             (only with qk_norm)
  layers/mlp_norm/scale  [L, d_model]
  layers/mlp/{gate,up}_proj [L, d_model, mlp_dim];  layers/mlp/down_proj [L, mlp_dim, d_model]
  final_norm/scale       [d_model]
  lm_head                [d_model, vocab_padded]   (absent when embeddings are tied)
  layers/{attn,mlp}/lora/<projection>/{a,b}  LoRA adapters, only with `config.lora` (lima_jax.lora)
"""

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lima_jax import lora as lora_lib
from lima_jax import sharding

# Large negative instead of -inf, so a fully masked row (padding) stays finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of one model; `configs/lima.py` `config.model` holds the same fields."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  mlp_dim: int
  n_kv_heads: int = 0  # 0 = n_heads.
  head_dim: int = 0  # 0 = d_model // n_heads.
  vocab_pad_multiple: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()  # Sorted (key, value) pairs; hashable.
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  residual_dropout: float = 0.0
  attention: str = "auto"
  # Which Hugging Face architecture this is; only export (config.json's class) depends on it.
  model_type: str = "llama"
  attention_bias: bool = False  # Biases on the q/k/v projections (Qwen2); o_proj has none.
  qk_norm: bool = False  # RMSNorm over head_dim on each head's q and k, before rotary (Qwen3).
  sliding_window: int = 0  # A key is visible only if q_pos - k_pos < window (Mistral); 0 = none.
  lora: lora_lib.LoraConfig | None = None  # Low-rank adapters on a frozen base (lima_jax.lora).

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
    if isinstance(self.lora, Mapping):
      object.__setattr__(self, "lora", lora_lib.LoraConfig.from_dict(self.lora))
    if self.n_heads % self.kv_heads:
      raise ValueError(f"model: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    if self.attention not in ("auto", "xla", "splash"):
      raise ValueError(f"model.attention={self.attention!r}; expected auto, xla or splash")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model.model_type={self.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    if self.sliding_window < 0:
      raise ValueError(f"model.sliding_window={self.sliding_window}; expected 0 (none) or a window size")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def padded_vocab_size(self) -> int:
    m = max(1, self.vocab_pad_multiple)
    return -(-self.vocab_size // m) * m

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
    """Builds from `config.model` (or JSON); fields that are not model shapes (init_from) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = dict(fields)
    if "rope_scaling" in fields and not isinstance(fields["rope_scaling"], tuple):
      fields["rope_scaling"] = dict(fields["rope_scaling"] or {})
    return cls(**{k: v for k, v in fields.items() if k in names})

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling)
    return d

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, include_embedding: bool = True) -> int:
    """Parameter count with the real (unpadded) vocabulary."""
    d, f, l = self.d_model, self.mlp_dim, self.n_layers
    attn = d * self.dim_per_head * (2 * self.n_heads + 2 * self.kv_heads)
    if self.attention_bias:
      attn += self.dim_per_head * (self.n_heads + 2 * self.kv_heads)
    if self.qk_norm:
      attn += 2 * self.dim_per_head
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    embed = d * self.vocab_size
    n = l * per_layer + d + head
    return n + embed if include_embedding or self.tie_embeddings else n


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj", "mlp_out"),
}

PARAM_LOGICAL_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("layers", "attn_norm", "scale"): ("layers", "norm"),
    ("layers", "attn", "q_proj"): ("layers", "embed", "heads", "head_dim"),
    ("layers", "attn", "k_proj"): ("layers", "embed", "kv_heads", "head_dim"),
    ("layers", "attn", "v_proj"): ("layers", "embed", "kv_heads", "head_dim"),
    ("layers", "attn", "o_proj"): ("layers", "heads", "head_dim", "embed"),
    ("layers", "attn", "q_bias"): ("layers", "heads", "head_dim"),
    ("layers", "attn", "k_bias"): ("layers", "kv_heads", "head_dim"),
    ("layers", "attn", "v_bias"): ("layers", "kv_heads", "head_dim"),
    ("layers", "attn", "q_norm", "scale"): ("layers", "norm"),
    ("layers", "attn", "k_norm", "scale"): ("layers", "norm"),
    ("layers", "mlp_norm", "scale"): ("layers", "norm"),
    ("layers", "mlp", "gate_proj"): ("layers", "embed", "mlp"),
    ("layers", "mlp", "up_proj"): ("layers", "embed", "mlp"),
    ("layers", "mlp", "down_proj"): ("layers", "mlp", "embed"),
    ("final_norm", "scale"): ("norm",),
    ("lm_head",): ("embed", "vocab"),
}


def _normal(key, shape, dtype, std=0.02):
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype, *, stack: tuple[int, ...] = ()):
    self.scale = nnx.Param(jnp.ones(stack + (dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> jax.Array:
  """Inverse frequencies [head_dim/2], with LLaMA-3 ("llama3") or linear position scaling."""
  dim = config.dim_per_head
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = dict(config.rope_scaling)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / float(scaling["factor"])
  if kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"model.rope_scaling: rope_type {kind!r} is not supported (default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates [B, S, heads, head_dim] by position, in Hugging Face's half-split layout."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, head_dim/2]
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# Self-attention splits its queries into blocks of this many rows, and each block reads only the
# keys at or before its end: a causal mask leaves the rest of the score matrix empty, so this
# skips nearly half of it (the TPU kernel skips the same blocks).
CAUSAL_BLOCK = 128


def dot_product_attention(q, k, v, q_positions, k_positions, q_segments=None, k_segments=None,
                          *, window: int = 0):
  """Attention over a KV cache or any keys; K/V heads are shared by query groups, not repeated.

  q: [B, S, H, D]; k, v: [B, T, KV, D]. A key is visible when its position is at most the
  query's, (with a `window`) fewer than `window` positions before it, and (when segment ids are
  given) it belongs to the same packed conversation.
  """
  mask = _visible(q_positions, k_positions, q_segments, k_segments, window=window)
  return _masked_attention(q, k, v, mask, 1)


def _visible(q_positions, k_positions, q_segments=None, k_segments=None, *,
             window: int = 0) -> jax.Array:
  """[B, S, T]: key t is at or before query s in position, within `window` positions of it
  (if > 0, as Hugging Face's sliding window: q_pos - k_pos < window), and in the same segment."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if window:
    mask &= q_positions[:, :, None] - k_positions[:, None, :] < window
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask


def causal_self_attention(q, k, v, q_positions, k_positions, q_segments=None, k_segments=None,
                          *, window: int = 0):
  """Self-attention of a training or scoring batch (q, k, v from the same S tokens).

  As `dot_product_attention`, and a key is also never after its query in the sequence, as in
  Hugging Face's causal mask and the TPU kernel; that lets query blocks skip later keys.
  """
  s = q.shape[1]
  if k.shape[1] != s:
    return dot_product_attention(q, k, v, q_positions, k_positions, q_segments, k_segments,
                                 window=window)
  mask = _visible(q_positions, k_positions, q_segments, k_segments, window=window)
  mask &= jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]
  blocks = s // CAUSAL_BLOCK if s % CAUSAL_BLOCK == 0 else 1
  return _masked_attention(q, k, v, mask, max(blocks, 1))


def _grouped(x, kv_heads):
  """[B, S, H, D] -> [B, S, KV, H/KV, D]: the query heads that share each K/V head."""
  b, s, h, d = x.shape
  return x.reshape(b, s, kv_heads, h // kv_heads, d)


def _scores(q, k, mask, key_layout: str = "btkd"):
  """Grouped queries [B, S, KV, G, D] and keys (`key_layout`: [B, T, KV, D], or "bktd" for a
  layer's own cache) -> masked scaled scores [B, KV, G, S, T] (float32)."""
  scores = jnp.einsum(f"bskgd,{key_layout}->bkgst", q, k, preferred_element_type=jnp.float32)
  scores = scores * (q.shape[-1] ** -0.5)
  return jnp.where(mask[:, None, None], scores, _MASK_VALUE)


def _query_blocks(queries: int, keys: int, blocks: int):
  """(start, end, key_end) of each query block: queries [start, end) attend to keys [0, key_end).

  One block reads every key; causal blocks (self-attention only) stop at their own end.
  """
  if blocks == 1:
    return [(0, queries, keys)]
  size = queries // blocks
  return [(i * size, (i + 1) * size, (i + 1) * size) for i in range(blocks)]


def _masked_attention_fwd(q, k, v, mask, blocks):
  b, s, h, d = q.shape
  kv = k.shape[2]
  outs, log_normalizers = [], []
  for start, end, key_end in _query_blocks(s, k.shape[1], blocks):
    scores = _scores(_grouped(q[:, start:end], kv), k[:, :key_end], mask[:, start:end, :key_end])
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
    probs = (unnormalized / row_sum).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v[:, :key_end])
    outs.append(out.reshape(b, end - start, h, d))
    log_normalizers.append(row_max + jnp.log(row_sum))
  out = jnp.concatenate(outs, axis=1)
  return out, (q, k, v, mask, out, jnp.concatenate(log_normalizers, axis=-2))


def _masked_attention_bwd(blocks, residuals, d_out):
  """Recomputes the probabilities from the saved log-normalizer instead of keeping them:
  [B, H, S, T] per layer would be the largest activation, and the recompute is one small matmul."""
  q, k, v, mask, out, log_normalizer = residuals
  b, s, h, d = q.shape
  kv = k.shape[2]
  d_qs = []
  d_k = jnp.zeros(k.shape, jnp.float32)
  d_v = jnp.zeros(v.shape, jnp.float32)
  for start, end, key_end in _query_blocks(s, k.shape[1], blocks):
    q_block = _grouped(q[:, start:end], kv)
    d_out_block = _grouped(d_out[:, start:end], kv)
    keys, values = k[:, :key_end], v[:, :key_end]
    probs = jnp.exp(_scores(q_block, keys, mask[:, start:end, :key_end])
                    - log_normalizer[..., start:end, :])
    d_v = d_v.at[:, :key_end].add(jnp.einsum("bkgst,bskgd->btkd", probs.astype(v.dtype),
                                             d_out_block, preferred_element_type=jnp.float32))
    d_probs = jnp.einsum("bskgd,btkd->bkgst", d_out_block, values,
                         preferred_element_type=jnp.float32)
    row_dot = jnp.einsum("bskgd,bskgd->bkgs", d_out_block.astype(jnp.float32),
                         _grouped(out[:, start:end], kv).astype(jnp.float32))
    d_scores = (probs * (d_probs - row_dot[..., None]) * (d ** -0.5)).astype(q.dtype)
    d_qs.append(jnp.einsum("bkgst,btkd->bskgd", d_scores, keys).reshape(b, end - start, h, d))
    d_k = d_k.at[:, :key_end].add(jnp.einsum("bkgst,bskgd->btkd", d_scores, q_block,
                                             preferred_element_type=jnp.float32))
  return jnp.concatenate(d_qs, axis=1), d_k.astype(k.dtype), d_v.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_attention(q, k, v, mask, blocks):
  """Softmax attention under a boolean mask [B, S, T], in `blocks` causal query blocks."""
  return _masked_attention_fwd(q, k, v, mask, blocks)[0]


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


def _attention_kernel(config: ModelConfig):
  """The attention implementation the config asks for; the Pallas kernel only exists on TPU."""
  if config.attention == "splash" or (config.attention == "auto" and jax.default_backend() == "tpu"):
    try:
      from lima_jax import tpu_attention  # pylint: disable=g-import-not-at-top
    except ImportError:
      if config.attention == "splash":
        raise
      return causal_self_attention
    return tpu_attention.make_attention(config)
  return causal_self_attention


class Attention(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
    c, pdt = config, config.param_dtype
    d, h, kv, hd = c.d_model, c.n_heads, c.kv_heads, c.dim_per_head
    self.q_proj = nnx.Param(_normal(rngs.params(), stack + (d, h, hd), pdt))
    self.k_proj = nnx.Param(_normal(rngs.params(), stack + (d, kv, hd), pdt))
    self.v_proj = nnx.Param(_normal(rngs.params(), stack + (d, kv, hd), pdt))
    self.o_proj = nnx.Param(_normal(rngs.params(), stack + (h, hd, d), pdt))
    if c.attention_bias:
      self.q_bias = nnx.Param(jnp.zeros(stack + (h, hd), pdt))
      self.k_bias = nnx.Param(jnp.zeros(stack + (kv, hd), pdt))
      self.v_bias = nnx.Param(jnp.zeros(stack + (kv, hd), pdt))
    if c.qk_norm:
      self.q_norm = RMSNorm(hd, c.rms_norm_eps, pdt, stack=stack)
      self.k_norm = RMSNorm(hd, c.rms_norm_eps, pdt, stack=stack)
    self.lora = lora_lib.make_adapters(config, "attn", stack)
    self.config = config

  def __call__(self, x, positions, segment_ids, cache=None, cache_positions=None, layer=None,
               lora_key=None):
    dt = x.dtype
    q = _plus(jnp.einsum("bsd,dhk->bshk", x, self.q_proj[...].astype(dt)),
              lora_lib.delta(self.config, self.lora, "q_proj", x, lora_key))
    k = _plus(jnp.einsum("bsd,dhk->bshk", x, self.k_proj[...].astype(dt)),
              lora_lib.delta(self.config, self.lora, "k_proj", x, lora_key))
    v = _plus(jnp.einsum("bsd,dhk->bshk", x, self.v_proj[...].astype(dt)),
              lora_lib.delta(self.config, self.lora, "v_proj", x, lora_key))
    if self.config.attention_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if self.config.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
    inv_freq = rope_frequencies(self.config)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    window = self.config.sliding_window
    if cache is None:
      out = _attention_kernel(self.config)(q, k, v, positions, positions, segment_ids, segment_ids,
                                           window=window)
      new_cache = None
    elif layer is None:  # This layer's own cache (see unstack_cache).
      rows = jnp.arange(k.shape[0])[:, None]
      new_cache = {"k": cache["k"].at[rows, :, positions].set(k.astype(cache["k"].dtype)),
                   "v": cache["v"].at[rows, :, :, positions].set(v.astype(cache["v"].dtype))}
      out = _attention_over_layer_cache(q, new_cache["k"].astype(dt), new_cache["v"].astype(dt),
                                        _visible(positions, cache_positions, window=window))
    else:
      new_cache = {"k": _write_cache(cache["k"], k, positions, layer),
                   "v": _write_cache(cache["v"], v, positions, layer)}
      k_all, v_all = (jax.lax.dynamic_index_in_dim(new_cache[n], layer, keepdims=False) for n in "kv")
      out = dot_product_attention(q, k_all.astype(dt), v_all.astype(dt), positions, cache_positions,
                                  window=window)
    out = sharding.constrain(out, ("batch", "length", "heads", "head_dim"))
    out = _plus(jnp.einsum("bshk,hkd->bsd", out, self.o_proj[...].astype(dt)),
                lora_lib.delta(self.config, self.lora, "o_proj", out, lora_key))
    return checkpoint_name(out, "out_proj"), new_cache


def _plus(x: jax.Array, lora_delta: jax.Array | None) -> jax.Array:
  """A projection plus its LoRA adapter's output, where it has one."""
  return x if lora_delta is None else x + lora_delta


def _write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array, layer) -> jax.Array:
  """Writes each row's new K or V [B, S, KV, D] into layer `layer` of the whole stacked cache
  [L, B, T, KV, D], at the row's own positions (positions past T are dropped).

  The stacked cache is carried through the layer loop and updated in place: slicing each layer
  out and stacking it back would copy the whole cache every decode step, which cost more than
  reading the weights at 1024 cached tokens.
  """
  rows = jnp.arange(new.shape[0])[:, None]
  return cache.at[layer, rows, positions].set(new.astype(cache.dtype))


def _attention_over_layer_cache(q, k, v, mask):
  """q [B, S, H, D] over one layer's cache, keys [B, KV, T, D] and values [B, KV, D, T]: the
  operand layouts of the two batched matmuls, so that no decode step transposes the cache."""
  b, s, h, d = q.shape
  kv = k.shape[1]
  probs = jax.nn.softmax(_scores(_grouped(q, kv), k, mask, "bktd"), axis=-1).astype(v.dtype)
  return jnp.einsum("bkgst,bkdt->bskgd", probs, v).reshape(b, s, h, d)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N]. On CPU its weight gradient transposes the smaller operand itself.

  XLA:CPU computes x^T @ g by transposing the larger output gradient g in a fused elementwise
  loop, which runs far below memory speed: 8% of the train benchmark's step. TPUs fold the
  transpose into the matmul, so they (and ahead-of-time compiles for them) keep the plain product.
  """
  if sharding.target_platform() != "cpu":
    return jnp.einsum("...k,kn->...n", x, w)
  return _cpu_dense(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


@jax.custom_vjp
def _cpu_dense(x, w):
  return x @ w


def _cpu_dense_fwd(x, w):
  return x @ w, (x, w)


def _cpu_dense_bwd(residuals, d_out):
  x, w = residuals
  d_x = d_out @ w.T
  # The barrier keeps the transpose a plain copy instead of a loop fused into its producer.
  if x.shape[1] <= d_out.shape[1]:
    d_w = jax.lax.optimization_barrier(x.T) @ d_out
  else:
    d_w = (jax.lax.optimization_barrier(d_out.T) @ x).T
  return d_x, d_w


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


class MLP(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
    d, f, pdt = config.d_model, config.mlp_dim, config.param_dtype
    self.gate_proj = nnx.Param(_normal(rngs.params(), stack + (d, f), pdt))
    self.up_proj = nnx.Param(_normal(rngs.params(), stack + (d, f), pdt))
    self.down_proj = nnx.Param(_normal(rngs.params(), stack + (f, d), pdt))
    self.lora = lora_lib.make_adapters(config, "mlp", stack)
    self.config = config

  def __call__(self, x, lora_key=None):
    dt = x.dtype
    gate = _plus(dense(x, self.gate_proj[...].astype(dt)),
                 lora_lib.delta(self.config, self.lora, "gate_proj", x, lora_key))
    up = _plus(dense(x, self.up_proj[...].astype(dt)),
               lora_lib.delta(self.config, self.lora, "up_proj", x, lora_key))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    out = _plus(dense(hidden, self.down_proj[...].astype(dt)),
                lora_lib.delta(self.config, self.lora, "down_proj", hidden, lora_key))
    return checkpoint_name(out, "mlp_out")


def _dropout(x, rate, key):
  """Inverted dropout whose rate is a traced scalar (it differs per scanned layer)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + drop(attn(norm(x))), then + drop(mlp(norm(x)))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
    self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps, config.param_dtype, stack=stack)
    self.attn = Attention(config, rngs=rngs, stack=stack)
    self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps, config.param_dtype, stack=stack)
    self.mlp = MLP(config, rngs=rngs, stack=stack)

  def __call__(self, x, positions, segment_ids, dropout_rate=None, dropout_key=None,
               cache=None, cache_positions=None, layer_index=None):
    lora_key = lora_lib.dropout_key(self.attn.config, dropout_key)
    attn_out, new_cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, cache_positions,
                                    layer_index, lora_key)
    mlp_key = None
    if dropout_key is not None and self.attn.config.residual_dropout > 0:
      attn_key, mlp_key = jax.random.split(dropout_key)
      attn_out = _dropout(attn_out, dropout_rate, attn_key)
    x = sharding.constrain(x + attn_out, ("batch", "length", "activation_embed"))
    mlp_out = self.mlp(self.mlp_norm(x), lora_key)
    if mlp_key is not None:
      mlp_out = _dropout(mlp_out, dropout_rate, mlp_key)
    x = sharding.constrain(x + mlp_out, ("batch", "length", "activation_embed"))
    return x, new_cache


def residual_dropout_rates(config: ModelConfig) -> jax.Array:
  """LIMA's schedule: layer i of L drops with rate max_rate * i / (L - 1) (0 at the bottom)."""
  l = config.n_layers
  if l == 1:
    return jnp.zeros((1,), jnp.float32)
  return config.residual_dropout * jnp.arange(l, dtype=jnp.float32) / (l - 1)


class Transformer(nnx.Module):
  """LlamaForCausalLM (or its Mistral/Qwen kin): token ids [B, S] -> float32 logits [B, S, vocab_size]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    embedding = _normal(rngs.params(), (c.padded_vocab_size, c.d_model), c.param_dtype)
    pad_rows = jnp.arange(c.padded_vocab_size)[:, None] >= c.vocab_size
    self.embed = nnx.Dict(embedding=nnx.Param(jnp.where(pad_rows, 0, embedding).astype(c.param_dtype)))
    self.layers = DecoderLayer(c, rngs=rngs, stack=(c.n_layers,))
    self.final_norm = RMSNorm(c.d_model, c.rms_norm_eps, c.param_dtype)
    if not c.tie_embeddings:
      head = _normal(rngs.params(), (c.d_model, c.padded_vocab_size), c.param_dtype)
      self.lm_head = nnx.Param(jnp.where(pad_rows[:, 0][None, :], 0, head).astype(c.param_dtype))

  def __call__(self, tokens, positions=None, segment_ids=None, *, dropout_key=None,
               padded_vocab: bool = False):
    """Logits for a batch. `dropout_key` turns residual dropout on (training); None = eval.

    With `padded_vocab` the logits keep the padded width, with padded entries at a large
    negative value so they never win a softmax; otherwise they are cut to `vocab_size`.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x, _ = self._decoder(tokens, positions, segment_ids, dropout_key, None, None)
    return self._logits(x, padded_vocab)

  def decode(self, tokens, positions, cache, *, padded_vocab: bool = False, layers=None):
    """One KV-cache step (prefill or a decode token); returns (logits, new cache).

    Each row writes its keys and values at its own `positions` and
    attends to cache slots at or before them, so right-padded prompts of different lengths can
    share a batch: slots beyond a row's length are masked until that row overwrites them.
    With `layers` (from `unstack_layers`), the decoder weights are those per-layer copies and
    `cache` is a tuple of per-layer caches (from `unstack_cache`), returned in the same form.
    """
    if layers is None:
      b, t = cache["k"].shape[1], cache["k"].shape[2]
    else:
      b, t = cache[0]["k"].shape[0], cache[0]["k"].shape[2]
    cache_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, new_cache = self._decoder(tokens, positions, None, None, cache, cache_positions, layers)
    return self._logits(x, padded_vocab), new_cache

  def _decoder(self, tokens, positions, segment_ids, dropout_key, cache, cache_positions,
               layers=None):
    c = self.config
    dt = jnp.dtype(c.dtype)
    x = jnp.take(self.embed["embedding"][...], tokens, axis=0).astype(dt)
    x = sharding.constrain(x, ("batch", "length", "activation_embed"))
    layer_def, layer_state = nnx.split(self.layers)
    rates = residual_dropout_rates(c)
    keys = None if dropout_key is None else jax.random.split(dropout_key, c.n_layers)

    def layer_step(carry, layer_inputs):
      x, cache = carry
      state, rate, key, index = layer_inputs
      if c.scan_layers and c.param_dtype != c.dtype:
        # Keeps each layer's param_dtype -> dtype cast inside the loop. XLA otherwise hoists the
        # cast of the whole stacked weights out of the scan (an optimization barrier does not
        # stop it): a second, bf16 copy of every weight, 2 bytes a parameter a chip (8 GiB for
        # 65B on 16 chips). Adding a zero that depends on the layer (this layer's dropout rate
        # times 0, not foldable in floating point) makes the cast's input differ per iteration;
        # it is exact and fuses into the cast.
        zero = rate * 0.0
        state = jax.tree.map(lambda w: w + zero.astype(w.dtype), state)
      layer = nnx.merge(layer_def, state)
      return layer(x, positions, segment_ids, rate, key, cache, cache_positions, index), None

    if layers is not None:
      new_caches = []
      for i, state in enumerate(layers):
        x, layer_cache = nnx.merge(layer_def, state)(x, positions, segment_ids, rates[i], None,
                                                     cache[i], cache_positions, None)
        new_caches.append(layer_cache)
      return self.final_norm(x), tuple(new_caches)

    policy = REMAT_POLICIES[c.remat_policy]
    if c.remat_policy != "none":
      layer_step = jax.checkpoint(layer_step, policy=policy, prevent_cse=not c.scan_layers)
    xs = (layer_state, rates, keys, jnp.arange(c.n_layers, dtype=jnp.int32))
    if c.scan_layers:
      (x, new_cache), _ = jax.lax.scan(layer_step, (x, cache), xs)
    else:
      carry = (x, cache)
      for i in range(c.n_layers):
        carry, _ = layer_step(carry, jax.tree.map(lambda a, i=i: a[i], xs))
      x, new_cache = carry
    return self.final_norm(x), new_cache

  def _logits(self, x, padded_vocab):
    c = self.config
    if c.tie_embeddings:
      head = self.embed["embedding"][...].astype(x.dtype).T
    else:
      head = self.lm_head[...].astype(x.dtype)
    logits = jnp.einsum("bsd,dv->bsv", x, head, preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "length", "vocab"))
    if not padded_vocab:
      return logits[..., :c.vocab_size]
    if c.padded_vocab_size == c.vocab_size:
      return logits
    return jnp.where(jnp.arange(c.padded_vocab_size) < c.vocab_size, logits, _MASK_VALUE)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    return init_cache(self.config, batch_size, max_len, dtype)


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """Empty KV cache {"k", "v"}: [layers, batch, max_len, kv_heads, head_dim] each."""
  shape = (config.n_layers, batch_size, max_len, config.kv_heads, config.dim_per_head)
  dtype = dtype or config.dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_LOGICAL_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


@functools.lru_cache(maxsize=32)
def graphdef(config: ModelConfig):
  """The static half of `nnx.split(Transformer(config))`, cached per config."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)[0]


def init_params(config: ModelConfig, key: jax.Array) -> dict:
  """Random parameters as a plain nested dict (see the module docstring for its layout)."""
  return nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(params=key))))


def abstract_params(config: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), without allocating."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def bind(config: ModelConfig, params: Mapping) -> Transformer:
  """A Transformer that computes with `params` (a plain dict); cheap, and fine inside jit."""
  return nnx.merge(graphdef(config), params)


def unstack_layers(params: Mapping) -> tuple[dict, ...]:
  """The decoder weights as one dict per layer (a copy), for `Transformer.decode(layers=...)`.

  XLA:CPU copies a layer's weights (and its KV cache) out of the stacked arrays before using
  them; in a decode loop that added a copy of the model per token. Slicing once before the loop
  avoids it; the per-layer caches are then updated in place.
  """
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))


# One layer's own cache (unstack_cache), laid out as the attention matmuls read it.
LAYER_CACHE_LOGICAL_AXES = {"k": ("batch", "kv_heads", "cache_length", "head_dim"),
                            "v": ("batch", "kv_heads", "head_dim", "cache_length")}


def unstack_cache(cache: Mapping[str, jax.Array]) -> tuple[dict, ...]:
  """A stacked KV cache as one dict per layer (see `unstack_layers`): keys [B, KV, T, D] and
  values [B, KV, D, T], as the attention matmuls read them."""
  return tuple({"k": jnp.transpose(cache["k"][i], (0, 2, 1, 3)),
                "v": jnp.transpose(cache["v"][i], (0, 2, 3, 1))} for i in range(cache["k"].shape[0]))


def param_logical_axes(params: Mapping) -> dict:
  """Logical axis names for each parameter, in the same tree structure as `params`."""
  def axes(path, _):
    key = tuple(p.key for p in path)
    if key not in PARAM_LOGICAL_AXES:
      adapter_axes = lora_lib.logical_axes(key)
      if adapter_axes is not None:
        return adapter_axes
      raise KeyError(f"no logical axes for parameter {'/'.join(key)}")
    return PARAM_LOGICAL_AXES[key]
  return jax.tree_util.tree_map_with_path(axes, params)


def param_shardings(config: ModelConfig, mesh) -> dict:
  """Each parameter's NamedSharding on `mesh`: the one set of rules training and sampling share."""
  shapes = abstract_params(config)
  return sharding.tree_shardings(param_logical_axes(shapes), shapes, mesh)


def is_norm_scale(path: tuple[str, ...]) -> bool:
  """RMSNorm scales (the q/k norms' included)."""
  return path[-1] == "scale"


def is_decay_exempt(path: tuple[str, ...]) -> bool:
  """Norm scales and biases are excluded from weight decay."""
  return is_norm_scale(path) or path[-1].endswith("_bias")
