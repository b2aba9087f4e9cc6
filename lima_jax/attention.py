"""Every attention path of the model, and the KV cache they read.

* `dot_product_attention`: the reference, over any keys (a KV cache included); `visible` is its mask.
* `causal_self_attention`: training and scoring on CPU/GPU, in causal query blocks with a
  hand-written VJP that keeps no [B, H, S, T] probabilities for the backward pass.
* `splash_attention`: the Pallas splash kernel on TPU (`model.attention=splash`, or `auto` there).
* `cached_attention`: one decode or prefill step, written into and read from the KV cache.
* `self_attention_fn(mode)`: which of the self-attention paths a config's `attention` selects.

Shapes: q [B, S, H, D], k/v [B, T, KV, D]; K/V heads are shared by query groups, never repeated.
Nothing here knows the model: callers pass the config fields (mode, window) a path needs.
"""

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import NamedSharding, PartitionSpec

from lima_jax import sharding

# Large negative instead of -inf, so a fully masked row (padding) stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Self-attention splits its queries into blocks of this many rows, and each block reads only the
# keys at or before its end: a causal mask leaves the rest of the score matrix empty, so this
# skips nearly half of it (the TPU kernel skips the same blocks).
CAUSAL_BLOCK = 128

# ---------------------------------------------------------------------------------------------
# The reference and the visibility mask.


def visible(q_positions, k_positions, q_segments=None, k_segments=None, *, window: int = 0) -> jax.Array:
  """[B, S, T]: key t is at or before query s in position, within `window` positions of it
  (if > 0, as Hugging Face's sliding window: q_pos - k_pos < window), and in the same segment."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if window:
    mask &= q_positions[:, :, None] - k_positions[:, None, :] < window
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask


def dot_product_attention(q, k, v, q_positions, k_positions, q_segments=None, k_segments=None,
                          *, window: int = 0):
  """Attention over a KV cache or any keys, visibility as `visible` says."""
  mask = visible(q_positions, k_positions, q_segments, k_segments, window=window)
  return _masked_attention(q, k, v, mask, 1)


def _grouped(x, kv_heads):
  """[B, S, H, D] -> [B, S, KV, H/KV, D]: the query heads that share each K/V head."""
  b, s, h, d = x.shape
  return x.reshape(b, s, kv_heads, h // kv_heads, d)


def _scores(q, k, mask):
  """Grouped queries [B, S, KV, G, D] and keys [B, T, KV, D] -> masked scaled scores
  [B, KV, G, S, T] (float32)."""
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
  scores = scores * (q.shape[-1] ** -0.5)
  return jnp.where(mask[:, None, None], scores, MASK_VALUE)


# ---------------------------------------------------------------------------------------------
# The training kernel: causal query blocks and a VJP that recomputes the probabilities.


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
  mask = visible(q_positions, k_positions, q_segments, k_segments, window=window)
  mask &= jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]
  blocks = s // CAUSAL_BLOCK if s % CAUSAL_BLOCK == 0 else 1
  return _masked_attention(q, k, v, mask, max(blocks, 1))


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

# ---------------------------------------------------------------------------------------------
# The Pallas splash kernel (TPU).
#
# It never materialises the [S, T] score matrix (at 2048 tokens, 64 heads and 2 sequences a
# device that matrix alone is 2 GiB of float32 per layer) and skips fully masked blocks. What it
# needs and how `splash_attention` provides it (the pitfalls MaxText's attention code works around):
#   * It runs per device, so it is wrapped in `shard_map` over the active mesh. Batch, heads and
#     query sequence are split as the activation rules say, but only over mesh axes that divide
#     them (`sharding.logical_to_spec`): a batch of 32 on 64 devices is split 32 ways and the rest
#     repeat the work, instead of failing as MaxText's assertion does.
#   * Keys and values must be whole along the sequence: with a `sequence` mesh axis the queries
#     stay split while K/V are gathered, and the kernel object itself (its block masks) is passed
#     through `shard_map` with `manual_sharding_spec`, so each shard masks with its own offset.
#   * Sequences must be a multiple of 128 (the TPU lane width); shorter or odd lengths, and any
#     call off TPU, use `causal_self_attention`.
#   * Causality is by index, not by the `positions` argument: it equals the XLA path whenever
#     positions count up by one within each segment, which is what the data pipeline produces.
#     A sliding window (Mistral) is the kernel's `LocalMask` with the window on the left side,
#     by index likewise, so its blocks wholly outside the window are skipped too.
#   * The kernel does not scale the logits: q is multiplied by D^-0.5 first.

LANES = 128


def _block(length: int) -> int:
  """The largest of 512, 256, 128 that divides `length` (MaxText's measured sweet spot is 512)."""
  for size in (512, 256, LANES):
    if length % size == 0:
      return size
  raise ValueError(f"splash attention needs a length divisible by {LANES}, got {length}")


def _single_axis(entry):
  """A PartitionSpec entry as one mesh axis name (or None); tuples of several are not used here."""
  if entry is None:
    return None
  if isinstance(entry, tuple):
    return entry[0] if len(entry) == 1 else entry
  return entry


def _specs(mesh, rules, b: int, s: int, h: int, kv: int):
  """Mesh axes for batch, heads and query length that divide this call's shapes."""
  batch = sharding.logical_to_spec(("batch",), rules, mesh, (b,))[0]
  heads = _single_axis(sharding.logical_to_spec(("heads",), rules, mesh, (h,))[0])
  if heads is not None and (isinstance(heads, tuple) or kv % mesh.shape[heads]):
    heads = None  # Query groups must stay with their K/V head.
  length = _single_axis(sharding.logical_to_spec(("length",), rules, mesh, (s,))[0])
  if length is not None and (isinstance(length, tuple) or (s // mesh.shape[length]) % LANES):
    length = None
  return batch, heads, length


def _kernel(s: int, t: int, h: int, head_shards: int, q_seq_shards: int, interpret: bool = False,
            window: int = 0):
  bq, bkv = _block(s // q_seq_shards), _block(t)
  sizes = splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)
  if window:  # Visible iff 0 <= q - k < window, as `visible`.
    head_mask = masks.LocalMask((s, t), window_size=(window - 1, 0), offset=0)
  else:
    head_mask = masks.CausalMask((s, t))
  mask = masks.MultiHeadMask([head_mask for _ in range(h)])
  return splash.make_splash_mha(mask=mask, block_sizes=sizes, head_shards=head_shards,
                                q_seq_shards=q_seq_shards, interpret=interpret)


def _run(kernel, q, k, v, q_segments, k_segments):
  """Per device: q [b, h, s, d], k/v [b, kv, t, d] -> [b, h, s, d]."""
  if q_segments is None:
    return jax.vmap(kernel)(q, k, v)
  return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
      q, k, v, q_segments, k_segments)


def splash_attention(q, k, v, q_positions, k_positions, q_segments=None, k_segments=None, *,
                     window: int = 0, interpret: bool = False):
  """Drop-in for `causal_self_attention` through the TPU kernel (see the notes above it for when
  it falls back). `interpret` runs the kernel in Pallas' interpreter, on any backend (for tests)."""
  b, s, h, d = q.shape
  t, kv = k.shape[1], k.shape[2]
  on_tpu = interpret or sharding.target_platform() == "tpu"
  if not on_tpu or s % LANES or s != t:
    return causal_self_attention(q, k, v, q_positions, k_positions, q_segments, k_segments,
                                 window=window)
  if q_segments is not None and k_segments is None:
    k_segments = q_segments
  q = q * np.asarray(d ** -0.5, q.dtype)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, length, D]
  active = sharding.active_mesh()
  if active is None:
    out = _run(_kernel(s, t, h, 1, 1, interpret, window), q, k, v, q_segments, k_segments)
    return out.transpose(0, 2, 1, 3)
  mesh, rules = active
  batch, heads, length = _specs(mesh, rules, b, s, h, kv)
  head_shards = mesh.shape[heads] if heads else 1
  seq_shards = mesh.shape[length] if length else 1
  kernel = _kernel(s, t, h, head_shards, seq_shards, interpret, window)
  kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(heads, length)))
  q_spec = PartitionSpec(batch, heads, length, None)
  kv_spec = PartitionSpec(batch, heads, None, None)
  segment_specs = (PartitionSpec(batch, length), PartitionSpec(batch, None))
  if q_segments is None:
    fn = lambda kern, q, k, v: _run(kern, q, k, v, None, None)
    specs, args = (kernel_spec, q_spec, kv_spec, kv_spec), (kernel, q, k, v)
  else:
    fn = _run
    specs = (kernel_spec, q_spec, kv_spec, kv_spec) + segment_specs
    args = (kernel, q, k, v, q_segments, k_segments)
  out = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
  return out.transpose(0, 2, 1, 3)


ATTENTION_MODES = ("auto", "xla", "splash")


def self_attention_fn(mode: str):
  """The self-attention path `config.attention` selects: splash, or `auto` on a TPU; else XLA."""
  if mode == "splash" or (mode == "auto" and jax.default_backend() == "tpu"):
    return splash_attention
  return causal_self_attention

# ---------------------------------------------------------------------------------------------
# The KV cache.
#
# Two layouts, because the two ways of running the decoder read it differently:
#   * stacked, {"k", "v"}: [layers, batch, length, kv_heads, head_dim] each, carried through the
#     scanned (or unrolled) layer loop and updated in place at each layer's index. This is the
#     cache `init_cache` makes, that `prefill`/`decode_step` take, and TPUs always use: slicing a
#     layer out and stacking it back would copy the whole cache every step.
#   * per layer, a tuple of {"k": [batch, kv_heads, head_dim, length],
#     "v": [batch, kv_heads, length, head_dim]} (`unstack_cache`), for the CPU decode loop over
#     per-layer weight copies (`model.decode_copies`): XLA:CPU copies a layer's slice out of the
#     stacked arrays before using it, and transposes the cache into the operand layout of the two
#     batched matmuls, on every token; one slice and transpose before the loop avoids both. In
#     these layouts both matmuls take the few grouped queries as their rows (q @ K, p @ V), which
#     XLA:CPU runs twice as fast as the layouts that make the cache length the rows.
# One layout for both would either change the TPU programs (the stacked cache in the matmul
# layout, which cannot be timed here) or bring the per-token transpose back on CPU.

CACHE_LOGICAL_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
LAYER_CACHE_LOGICAL_AXES = {"k": ("batch", "kv_heads", "head_dim", "cache_length"),
                            "v": ("batch", "kv_heads", "cache_length", "head_dim")}


def init_cache(layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
               dtype) -> dict[str, jax.Array]:
  """An empty stacked cache {"k", "v"}: [layers, batch, length, kv_heads, head_dim] each."""
  shape = (layers, batch, length, kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def unstack_cache(cache: Mapping[str, jax.Array]) -> tuple[dict, ...]:
  """A stacked cache as one dict per layer, in the per-layer layout."""
  return tuple({"k": jnp.transpose(cache["k"][i], (0, 2, 3, 1)),
                "v": jnp.transpose(cache["v"][i], (0, 2, 1, 3))} for i in range(cache["k"].shape[0]))


def resize_cache(cache, length: int):
  """The cache (either layout) cut to its first `length` positions, or padded with zeros to them."""
  def resize(array, axes):
    axis = axes.index("cache_length")
    have = array.shape[axis]
    if length <= have:
      return jax.lax.slice_in_dim(array, 0, length, axis=axis)
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, length - have)
    return jnp.pad(array, pad)
  return jax.tree.map(resize, cache, cache_logical_axes(cache))


def cache_logical_axes(cache) -> dict | tuple:
  """Logical axis names of each cache array (either layout), in the cache's tree structure."""
  if isinstance(cache, tuple):
    return tuple(dict(LAYER_CACHE_LOGICAL_AXES) for _ in cache)
  return {name: CACHE_LOGICAL_AXES for name in cache}


def constrain_cache(cache):
  """The cache (either layout) held to its logical sharding under the active mesh."""
  if isinstance(cache, tuple):
    return tuple({n: sharding.constrain(a, LAYER_CACHE_LOGICAL_AXES[n]) for n, a in c.items()}
                 for c in cache)
  return {n: sharding.constrain(a, CACHE_LOGICAL_AXES) for n, a in cache.items()}


def cache_batch_and_length(cache) -> tuple[int, int]:
  """(batch, slots) of a cache in either layout."""
  if isinstance(cache, tuple):
    return cache[0]["k"].shape[0], cache[0]["k"].shape[3]
  return cache["k"].shape[1], cache["k"].shape[2]


def cached_attention(q, k, v, cache, positions, cache_positions, layer=None, *, window: int = 0):
  """Writes this step's k, v [B, S, KV, D] into the cache at each row's own positions and attends
  q over every visible slot; returns (out [B, S, H, D], new cache).

  `layer` (traced) indexes a stacked cache; None means `cache` is this layer's own (per-layer
  layout). Positions past the cache length are dropped.
  """
  if layer is None:
    rows = jnp.arange(k.shape[0])[:, None]
    new_cache = {"k": cache["k"].at[rows, :, :, positions].set(k.astype(cache["k"].dtype)),
                 "v": cache["v"].at[rows, :, positions].set(v.astype(cache["v"].dtype))}
    out = _attention_over_layer_cache(q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype),
                                      visible(positions, cache_positions, window=window))
    return out, new_cache
  new_cache = {"k": _write_layer(cache["k"], k, positions, layer),
               "v": _write_layer(cache["v"], v, positions, layer)}
  k_all, v_all = (jax.lax.dynamic_index_in_dim(new_cache[n], layer, keepdims=False) for n in "kv")
  out = dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), positions,
                              cache_positions, window=window)
  return out, new_cache


def _write_layer(cache: jax.Array, new: jax.Array, positions: jax.Array, layer) -> jax.Array:
  """Writes each row's new K or V [B, S, KV, D] into layer `layer` of a stacked cache, in place."""
  rows = jnp.arange(new.shape[0])[:, None]
  return cache.at[layer, rows, positions].set(new.astype(cache.dtype))


def _attention_over_layer_cache(q, k, v, mask):
  """q [B, S, H, D] over one layer's cache, keys [B, KV, D, T] and values [B, KV, T, D]: the
  operand layouts of the two batched matmuls, so that no decode step transposes the cache."""
  b, s, h, d = q.shape
  kv, t = k.shape[1], k.shape[3]
  g = h // kv
  rows = jnp.transpose(_grouped(q, kv), (0, 2, 3, 1, 4)).reshape(b, kv, g * s, d)  # [B, KV, G*S, D]
  batch = ((0, 1), (0, 1))
  scores = jax.lax.dot_general(rows, k, (((3,), (2,)), batch), preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kv, g, s, t) * (d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * s, t)
  out = jax.lax.dot_general(probs, v, (((3,), (2,)), batch))  # [B, KV, G*S, D]
  return jnp.transpose(out.reshape(b, kv, g, s, d), (0, 3, 1, 2, 4)).reshape(b, s, h, d)
