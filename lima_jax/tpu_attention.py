"""Causal attention through the Pallas splash-attention kernel on TPU (`model.attention=splash`).

Same contract as `model.dot_product_attention`: q [B, S, H, D], k/v [B, T, KV, D], a key visible
when it is at or before the query and (with segment ids) in the same packed conversation. The
kernel never materialises the [S, T] score matrix (at 2048 tokens, 64 heads and 2 sequences a
device that matrix alone is 2 GiB of float32 per layer), skips fully masked blocks, and shares
each K/V head between its query group without repeating it (GQA).

What the kernel needs and how this wrapper provides it (the pitfalls MaxText's attention code
works around):
  * It runs per device, so it is wrapped in `shard_map` over the active mesh. Batch, heads and
    query sequence are split as the activation rules say, but only over mesh axes that divide
    them (`sharding.logical_to_spec`): a batch of 32 on 64 devices is split 32 ways and the rest
    repeat the work, instead of failing as MaxText's assertion does.
  * Keys and values must be whole along the sequence: with a `sequence` mesh axis the queries
    stay split while K/V are gathered, and the kernel object itself (its block masks) is passed
    through `shard_map` with `manual_sharding_spec`, so each shard masks with its own offset.
  * Sequences must be a multiple of 128 (the TPU lane width); shorter or odd lengths, and any
    call off TPU, use the XLA implementation.
  * Causality is by index, not by the `positions` argument: it equals the XLA path whenever
    positions count up by one within each segment, which is what the data pipeline produces.
    A sliding window (Mistral) is the kernel's `LocalMask` with the window on the left side,
    by index likewise, so its blocks wholly outside the window are skipped too.
  * The kernel does not scale the logits: q is multiplied by D^-0.5 first.
"""

import functools

import jax
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import NamedSharding, PartitionSpec

from lima_jax import sharding

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
  if window:  # Visible iff 0 <= q - k < window, as model._visible.
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
  """Drop-in for `model.causal_self_attention` (see the module docstring for when it falls back).

  `interpret` runs the kernel in Pallas' interpreter, on any backend (for tests).
  """
  from lima_jax import model  # pylint: disable=g-import-not-at-top  (model imports this module)
  b, s, h, d = q.shape
  t, kv = k.shape[1], k.shape[2]
  on_tpu = interpret or sharding.target_platform() == "tpu"
  if not on_tpu or s % LANES or s != t:
    return model.causal_self_attention(q, k, v, q_positions, k_positions, q_segments, k_segments,
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


def make_attention(config):
  """The attention function `model.py` uses when `config.attention` selects the TPU kernel."""
  del config  # One kernel serves every shape and window; block sizes follow the call's lengths.
  return functools.partial(splash_attention)
