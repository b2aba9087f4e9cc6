"""`load_pretrained`: a ready model from a Hugging Face directory or a lima_jax checkpoint."""

import os

import jax.numpy as jnp

from lima_jax import model as model_lib
from lima_jax import source as source_lib
from lima_jax.convert.hf_config import ConversionError
from lima_jax.convert.hf_config import DTYPES


def load_pretrained(path: str | os.PathLike, dtype: str = "float32") -> model_lib.Transformer:
  """A ready model from a Hugging Face directory or a lima_jax checkpoint (`lima_jax.source`).

  Returns the `Transformer` (Flax NNX) bound to the parameters cast to `dtype`, computing in
  `dtype`: `model(tokens)` maps int32 ids [batch, seq] to float32 logits [batch, seq, vocab]
  (the real vocabulary, padding cut), and `model.config` is its ModelConfig. Wrap calls in
  `nnx.jit` (or `jax.jit` over `model_lib.bind`) for speed.
  """
  dtype = jnp.dtype(dtype).name
  if dtype not in DTYPES:
    raise ConversionError(f"dtype={dtype!r}; expected one of {DTYPES}")
  try:
    opened = source_lib.open_model(path, dtype=dtype)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: {e}") from e
  return model_lib.bind(opened.model_config, opened.read_params())
