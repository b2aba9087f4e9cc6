"""`hf_to_orbax`: a Hugging Face model directory -> a lima_jax checkpoint, one chunk at a time."""

import math
import os

import jax.numpy as jnp
import numpy as np
from etils import epath

from lima_jax import checkpoint
from lima_jax import metrics
from lima_jax import paths
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.convert import hf_reader
from lima_jax.convert import orbax_stream
from lima_jax.convert import param_names
from lima_jax.convert.hf_config import ConversionError
from lima_jax.convert.hf_config import DTYPES
from lima_jax.convert.hf_config import SPECIAL_TOKENS_KEY
from lima_jax.model import ModelConfig


def _load_tokenizer_blob(hf_dir: epath.Path, eot: str, strict: bool) -> dict | None:
  """The directory's tokenizer as a checkpoint blob; None if it has none.

  A tokenizer that fails to load is an error when `strict` (the vocabulary size depends on it),
  else a warning: the weights convert regardless.
  """
  if not any((hf_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
    return None
  try:
    return tokenizer_lib.load_tokenizer(hf_dir, eot=eot).to_blob()
  except (ValueError, OSError) as e:
    if strict:
      raise ConversionError(f"{hf_dir}: tokenizer: {e}") from e
    metrics.warn("%s: tokenizer not stored (%s)", hf_dir, e)
    return None


def _chunk_shape(m: param_names.ParamMap, itemsize: int, block_bytes: int = 8 * 2**20) -> tuple[int, ...]:
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
  hf = hf_reader.HFCheckpoint(hf_dir)
  config = hf.model_config
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r}; expected one of {DTYPES}")
  if dtype is None:
    for path in hf.maps:
      if hf.source_dtype(path) == np.float64:
        raise ConversionError(f"{hf_dir}: {hf.maps[path].hf_name} is float64; pass --dtype "
                              f"float32 (or bfloat16) to store it")
  eot_text = eot or tokenizer_lib.DEFAULT_EOT
  blob = _load_tokenizer_blob(hf_dir, eot_text, strict=add_eot)
  new_vocab = config.vocab_size
  if add_eot:
    tok_vocab = tokenizer_lib.load_tokenizer_from_blob(blob).vocab_size if blob else 0
    new_vocab = max(config.vocab_size + (0 if blob else 1), tok_vocab)
  out_config = config.replace(vocab_size=new_vocab)
  out_maps = param_names.param_maps(out_config)
  fills = {}
  if new_vocab > config.vocab_size:
    for path in out_maps:
      if out_maps[path].is_vocab:
        fills[path] = param_names.RowFill(config.vocab_size, new_vocab, hf.row_mean(path))
  elif add_eot and blob:  # A spare row for EOT already (Qwen): it starts at the mean likewise.
    tok = tokenizer_lib.load_tokenizer_from_blob(blob)
    if not tok.eot_declared and tok.eot_id < config.vocab_size:
      for path in out_maps:
        if out_maps[path].is_vocab:
          fills[path] = param_names.RowFill(tok.eot_id, tok.eot_id + 1, hf.row_mean(path))
  tree: dict = {}
  for path, m in out_maps.items():
    want = jnp.dtype(dtype) if dtype else hf.source_dtype(path)
    param_names.set_path(tree, path, orbax_stream.StreamedArray(
        m.shape, want, _chunk_shape(m, want.itemsize),
        lambda index, path=path, m=m, want=want: hf.read(path, index, want, fills.get(path), m),
        m.array_storage_order,
        lambda index, path=path, m=m, want=want: hf.byte_range(path, index, want, fills.get(path), m)))
  if dtype:
    out_config = out_config.replace(param_dtype=dtype)
  config_json = {**out_config.to_dict(), SPECIAL_TOKENS_KEY: hf.special_tokens()}
  with paths.staged_directory(ckpt_dir, fresh=True, complete_when=checkpoint.ORBAX_COMMIT_FILE) as out:
    orbax_stream.save_streamed(out, tree, config_json, blob)
  return out_config
