"""`load_pretrained`: a ready model from a Hugging Face directory or a lima_jax checkpoint."""

import os

import jax
import jax.numpy as jnp

from lima_jax import checkpoint
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax.convert import hf_reader
from lima_jax.convert import model_readers
from lima_jax.convert.hf_config import CONFIG_FILE
from lima_jax.convert.hf_config import ConversionError
from lima_jax.convert.hf_config import DTYPES


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
    params, config = hf_reader.load_hf_params(path, dtype=dtype)
    return model_lib.bind(config.replace(dtype=dtype), params)
  try:
    ckpt = checkpoint.resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: neither a Hugging Face model directory (no {CONFIG_FILE}) "
                            f"nor a lima_jax checkpoint ({e})") from e
  config = checkpoint.read_model_config(ckpt).replace(param_dtype=dtype, dtype=dtype)
  if config.lora is not None:  # Adapters: merged into their base.
    return model_lib.bind(config.replace(lora=None),
                          model_readers.load_merged_params(ckpt, dtype=dtype))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        model_lib.abstract_params(config))
  return model_lib.bind(config, checkpoint.restore_params(ckpt, target))
