"""The CPU attention paths against a plain softmax reference: blocked causal self-attention
(forward and the hand-written backward) and attention over a longer KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import attention


def reference_attention(q, k, v, mask):
  b, s, h, d = q.shape
  kv = k.shape[2]
  k = jnp.repeat(k, h // kv, axis=2)
  v = jnp.repeat(v, h // kv, axis=2)
  scores = jnp.einsum("bshd,bthd->bhst", q, k) * d ** -0.5
  scores = jnp.where(mask[:, None], scores, -1e30)
  return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(scores, axis=-1), v)


def _inputs(seq, heads=4, kv_heads=2, dim=8, keys=None):
  r = jax.random.split(jax.random.key(0), 4)
  keys = keys or seq
  q = jax.random.normal(r[0], (2, seq, heads, dim))
  k = jax.random.normal(r[1], (2, keys, kv_heads, dim))
  v = jax.random.normal(r[2], (2, keys, kv_heads, dim))
  return q, k, v, jax.random.normal(r[3], q.shape)


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 20])  # Full causal, and Mistral's sliding window.
@pytest.mark.parametrize("seq", [2 * attention.CAUSAL_BLOCK, 48])  # Blocked, and one block.
def test_causal_self_attention_matches_reference(seq, window):
  q, k, v, weights = _inputs(seq)
  # Row 0: two packed conversations; row 1: one conversation, then padding (segment 0).
  cut = seq // 3
  segments = jnp.stack([jnp.where(jnp.arange(seq) < cut, 1, 2), jnp.where(jnp.arange(seq) < seq - 5, 1, 0)])
  positions = jnp.stack([jnp.where(jnp.arange(seq) < cut, jnp.arange(seq), jnp.arange(seq) - cut),
                         jnp.arange(seq)])
  index = jnp.arange(seq)
  mask = ((index[None, :] <= index[:, None])[None] & (segments[:, :, None] == segments[:, None, :]))
  if window:
    mask &= positions[:, :, None] - positions[:, None, :] < window

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * weights)

  ours = lambda q, k, v: attention.causal_self_attention(q, k, v, positions, positions, segments,
                                                         segments, window=window)
  ref = lambda q, k, v: reference_attention(q, k, v, mask)
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=2e-6, rtol=1e-5)
  got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_attention_over_a_longer_cache_reads_every_visible_key():
  q, k, v, _ = _inputs(3, keys=20)
  q_positions = jnp.array([[9, 10, 11], [2, 3, 4]])
  k_positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, q_positions, k_positions),
                             reference_attention(q, k, v, mask), atol=2e-6, rtol=1e-5)
