"""The LLaMA decoder family in Flax NNX, numerically matching Hugging Face.

One config covers LLaMA-1/2/3, Mistral, Qwen2/2.5 and Qwen3 (`model_type`): multi-head,
grouped-query and multi-query attention, rotary embeddings with LLaMA-3 scaling, SwiGLU, tied or
untied embeddings, a vocabulary padded for even sharding, and the families' differences: q/k/v
biases (Qwen2), RMSNorm over each head's queries and keys before rotary (Qwen3) and a sliding
attention window (Mistral v0.1).
Decoder layers keep their parameters stacked on a leading `layers` axis, so the same checkpoint
runs under `jax.lax.scan` (one compiled layer) or unrolled. LIMA's residual dropout rate grows
linearly with depth and is passed to the scanned layer as data. The config is
`lima_jax.model_config`; attention (every path, and the KV cache) is `lima_jax.attention`.

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

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lima_jax import attention
from lima_jax import lora as lora_lib
from lima_jax import sharding
from lima_jax.matmul import dense
from lima_jax.model_config import REMAT_POLICIES, ModelConfig  # `model.ModelConfig` is the config.

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
      out = attention.self_attention_fn(self.config.attention)(
          q, k, v, positions, positions, segment_ids, segment_ids, window=window)
      new_cache = None
    else:
      out, new_cache = attention.cached_attention(q, k, v, cache, positions, cache_positions, layer,
                                                  window=window)
    out = sharding.constrain(out, ("batch", "length", "heads", "head_dim"))
    out = _plus(jnp.einsum("bshk,hkd->bsd", out, self.o_proj[...].astype(dt)),
                lora_lib.delta(self.config, self.lora, "o_proj", out, lora_key))
    return checkpoint_name(out, "out_proj"), new_cache


def _plus(x: jax.Array, lora_delta: jax.Array | None) -> jax.Array:
  """A projection plus its LoRA adapter's output, where it has one."""
  return x if lora_delta is None else x + lora_delta


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
    return self.output_logits(x, padded_vocab)

  def decode(self, tokens, positions, cache, *, padded_vocab: bool = False, copies=None):
    """One KV-cache step (prefill or a decode token); returns (logits, new cache).

    Each row writes its keys and values at its own `positions` and
    attends to cache slots at or before them, so right-padded prompts of different lengths can
    share a batch: slots beyond a row's length are masked until that row overwrites them.
    With `copies` (from `decode_copies`), the decoder weights and the head are those copies and
    `cache` is a tuple of per-layer caches (from `attention.unstack_cache`), returned in the same form.
    """
    b, t = attention.cache_batch_and_length(cache)
    cache_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    layers, head = (None, None) if copies is None else (copies["layers"], copies["head"])
    x, new_cache = self._decoder(tokens, positions, None, None, cache, cache_positions, layers)
    return self.output_logits(x, padded_vocab, head), new_cache

  def embed_tokens(self, tokens):
    """The decoder's input [B, S, d_model] in the compute dtype."""
    x = jnp.take(self.embed["embedding"][...], tokens, axis=0).astype(jnp.dtype(self.config.dtype))
    return sharding.constrain(x, ("batch", "length", "activation_embed"))

  def layer_scan_inputs(self, dropout_key):
    """What the scan over layers reads per layer besides its weights: (dropout rates, dropout
    keys or None, layer indices)."""
    c = self.config
    keys = None if dropout_key is None else jax.random.split(dropout_key, c.n_layers)
    return residual_dropout_rates(c), keys, jnp.arange(c.n_layers, dtype=jnp.int32)

  def layer_step(self, positions, segment_ids, cache_positions=None):
    """The scan body over layers, remat policy applied: ((x, cache), (layer weights, rate,
    key, index)) -> ((x, cache), None). One layer's weights are a slice of params["layers"]."""
    c = self.config
    layer_def = nnx.split(self.layers)[0]

    def layer_step(carry, layer_inputs):
      x, cache = carry
      state, rate, key, index = layer_inputs
      if c.scan_layers and c.param_dtype != c.dtype:
        # Keeps each layer's param_dtype -> dtype cast inside the loop. XLA otherwise hoists the
        # cast of the whole stacked weights out of the scan (an optimization barrier does not
        # stop it): a second, bf16 copy of every weight. Adding a zero that depends on the layer
        # (its dropout rate times 0, not foldable in floating point) makes the cast's input differ
        # per iteration; it is exact and fuses into the cast.
        zero = rate * 0.0
        state = jax.tree.map(lambda w: w + zero.astype(w.dtype), state)
      layer = nnx.merge(layer_def, state)
      return layer(x, positions, segment_ids, rate, key, cache, cache_positions, index), None

    if c.remat_policy == "none":
      return layer_step
    return jax.checkpoint(layer_step, policy=REMAT_POLICIES[c.remat_policy],
                          prevent_cse=not c.scan_layers)

  def output_logits(self, x, padded_vocab: bool = False, head=None):
    """The final norm and the head over the last layer's output (`head`: a [d_model, vocab] copy
    to use instead of the parameters')."""
    return self._logits(self.final_norm(x), padded_vocab, head)

  def _decoder(self, tokens, positions, segment_ids, dropout_key, cache, cache_positions,
               layers=None):
    c = self.config
    x = self.embed_tokens(tokens)
    layer_def, layer_state = nnx.split(self.layers)
    rates, keys, indices = self.layer_scan_inputs(dropout_key)

    if layers is not None:
      new_caches = []
      for i, state in enumerate(layers):
        x, layer_cache = nnx.merge(layer_def, state)(x, positions, segment_ids, rates[i], None,
                                                     cache[i], cache_positions, None)
        new_caches.append(layer_cache)
      return x, tuple(new_caches)

    layer_step = self.layer_step(positions, segment_ids, cache_positions)
    xs = (layer_state, rates, keys, indices)
    if c.scan_layers:
      (x, new_cache), _ = jax.lax.scan(layer_step, (x, cache), xs)
    else:
      carry = (x, cache)
      for i in range(c.n_layers):
        carry, _ = layer_step(carry, jax.tree.map(lambda a, i=i: a[i], xs))
      x, new_cache = carry
    return x, new_cache

  def _logits(self, x, padded_vocab, head=None):
    c = self.config
    if head is not None:
      head = head.astype(x.dtype)
    elif c.tie_embeddings:
      head = self.embed["embedding"][...].astype(x.dtype).T
    else:
      head = self.lm_head[...].astype(x.dtype)
    logits = jnp.einsum("bsd,dv->bsv", x, head, preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "length", "vocab"))
    if not padded_vocab:
      return logits[..., :c.vocab_size]
    if c.padded_vocab_size == c.vocab_size:
      return logits
    return jnp.where(jnp.arange(c.padded_vocab_size) < c.vocab_size, logits, attention.MASK_VALUE)


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """This model's empty stacked KV cache (layouts: lima_jax.attention)."""
  return attention.init_cache(config.n_layers, batch_size, max_len, config.kv_heads,
                              config.dim_per_head, dtype or config.dtype)


@functools.lru_cache(maxsize=32)
def graphdef(config: ModelConfig):
  """The static half of `nnx.split(Transformer(config))`, cached per config."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)[0]


def init_params(config: ModelConfig, key: jax.Array) -> dict:
  """Random parameters as a plain nested dict (see the module docstring for its layout)."""
  return nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(params=key))))


def lora_base_params(config: ModelConfig, seed: int) -> dict:
  """The random base of a LoRA model that names no pretrained one: the parameters full fine-tuning
  from `seed` starts from (pure, so a resumed run and an export rebuild it exactly)."""
  init_key, _ = jax.random.split(jax.random.key(seed))
  return init_params(lora_lib.base_config(config), init_key)


def abstract_params(config: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), without allocating."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def bind(config: ModelConfig, params: Mapping) -> Transformer:
  """A Transformer that computes with `params` (a plain dict); cheap, and fine inside jit."""
  return nnx.merge(graphdef(config), params)


def decode_copies(params: Mapping) -> dict:
  """Copies of the weights laid out for a CPU decode loop, for `Transformer.decode(copies=...)`:
  {"layers": one dict per layer, "head": a tied embedding as [d_model, vocab], else None}.

  XLA:CPU copies a layer's weights (and its KV cache) out of the stacked arrays before using
  them; in a decode loop that added a copy of the model per token. Slicing once before the loop
  avoids it; the per-layer caches are then updated in place. Its matmul also reads a
  [d_model, vocab] head about a fifth faster than the [vocab, d_model] embedding.
  """
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))
  head = None if "lm_head" in params else jnp.transpose(params["embed"]["embedding"])
  return {"layers": layers, "head": head}


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
