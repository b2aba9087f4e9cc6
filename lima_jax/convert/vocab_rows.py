"""Rows for new tokens (EOT) in the embedding and LM head, at the mean of the existing rows."""

from typing import Mapping

import jax.numpy as jnp

from lima_jax.model import ModelConfig


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
