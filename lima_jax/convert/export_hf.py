"""`orbax_to_hf`: a lima_jax checkpoint -> a Hugging Face directory of its family, a layer at a time."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from lima_jax import checkpoint
from lima_jax import metrics
from lima_jax import paths
from lima_jax import safetensors_io
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.convert import model_readers
from lima_jax.convert import orbax_stream
from lima_jax.convert import param_names
from lima_jax.convert.hf_config import CONFIG_FILE
from lima_jax.convert.hf_config import ConversionError
from lima_jax.convert.hf_config import DTYPES
from lima_jax.convert.hf_config import generation_config
from lima_jax.convert.hf_config import GENERATION_CONFIG_FILE
from lima_jax.convert.hf_config import INDEX_FILE
from lima_jax.convert.hf_config import model_config_to_hf_config
from lima_jax.convert.hf_config import SPECIAL_TOKENS_KEY
from lima_jax.model import ModelConfig


def _tensor_sources(ckpt, maps, stores, files, dtype) -> list[safetensors_io.TensorSource]:
  """The Hugging Face tensors in file order, each read a layer (or a block of rows) at a time."""

  def stored_dtype(path):
    return np.dtype(stores[path].dtype.numpy_dtype)

  def hf_block(m, store, index, rows=None):
    """Block `index` of a parameter as Hugging Face rows [rows) (default: the whole layer).

    A TensorStore reads it through a view in Hugging Face axis order: chunks stored in that
    order (what hf_to_orbax writes) decode with a plain copy, others TensorStore transposes."""
    start, stop = rows or (0, m.hf_rows)
    if isinstance(store, ts.TensorStore):
      block = read(m, store[index][ts.d[list(m.storage_order)].transpose[:]])
      return block.reshape((stop - start,) + m.hf_shape[1:])
    return m.to_hf(read(m, store[index]), rows)

  def read(m, view) -> np.ndarray:
    try:
      return view.read().result()
    except ValueError as e:  # TensorStore's error for a missing, short or corrupt chunk.
      raise ConversionError(f"{ckpt}: cannot read parameter {'/'.join(m.path)}: {e}") from e

  def file_ranges(m, layer, want):
    """The tensor's bytes as pieces of chunk files, when they are stored so (hf_to_orbax's
    layout, same dtype): copied unread. Else None."""
    chunks = files.get(m.path)
    if chunks is None or chunks.order != m.array_storage_order or chunks.dtype != want:
      return None
    start = max(layer, 0) * math.prod(m.layer_shape)
    return chunks.ranges(start, start + math.prod(m.hf_shape))

  def blocks(name, m, layer):
    want = jnp.dtype(dtype) if dtype else stored_dtype(m.path)
    ranges = file_ranges(m, layer, want)
    if ranges is not None:
      yield from ranges
      return
    store = stores[m.path]
    if layer >= 0:
      yield param_names.cast(hf_block(m, store, layer), want, name)
      return
    row_bytes = math.prod(m.col_shape or (1,)) * stored_dtype(m.path).itemsize
    for rows in safetensors_io.iter_row_blocks(m.hf_rows, row_bytes, 16 * 2**20):
      yield param_names.cast(hf_block(m, store, m.lima_index_of_rows(*rows), rows), want, name)

  sources = [safetensors_io.TensorSource(
      name, jnp.dtype(dtype) if dtype else stored_dtype(m.path), m.hf_shape,
      lambda name=name, m=m, layer=layer: blocks(name, m, layer))
             for name, m, layer in param_names.hf_tensor_order(maps)]
  return sources


def _special_tokens(ckpt, config_json, config: ModelConfig, blob):
  """(BOS/EOS/pad ids for config.json, the stored tokenizer or None, the EOT id to stop at or None)."""
  tokens = dict(config_json.get(SPECIAL_TOKENS_KEY) or {})
  tokenizer, eot_id = None, None
  if blob is not None:
    tokenizer = tokenizer_lib.load_tokenizer_from_blob(blob)
    tokens = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
              "pad_token_id": tokenizer.pad_id}
    eot_id = tokenizer.eot_id
    if eot_id >= config.vocab_size:  # A base model converted before its EOT row was added.
      metrics.warn("%s: the model has %d rows, no row for EOT (id %d); generation_config.json stops "
                   "at EOS only", ckpt, config.vocab_size, eot_id)
      eot_id = None
  return tokens, tokenizer, eot_id


def orbax_to_hf(ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike, *,
                max_shard_size: str | int = "5GB", dtype: str | None = None) -> list[str]:
  """Exports a lima_jax checkpoint (or a workdir's newest) as a Hugging Face directory of its family.

  Writes safetensors shards of at most `max_shard_size` (with model.safetensors.index.json when
  there are several), config.json, generation_config.json (LIMA's sampling) and, when the
  checkpoint carries one, the tokenizer (with LIMA's chat template). A few layer tensors are in
  memory at a time (one being written, two read ahead on a thread). Tensors that hf_to_orbax
  stored as chunk files in Hugging Face byte order are copied file to file, unread, when the
  dtype is kept; others are read through TensorStore. `dtype=None` keeps the stored dtypes.
  Returns the written file names.
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
  config_json = checkpoint.read_model_config_json(ckpt)
  config = ModelConfig.from_dict(config_json)
  blob = checkpoint.read_tokenizer_blob(ckpt)
  if config.lora is not None:  # Adapters: merged into their base, one layer at a time.
    stores, config = model_readers.merged_stores(ckpt)
    files = {}
  else:
    stores = orbax_stream.open_params(ckpt)
    files = orbax_stream.chunk_files(ckpt, stores)
  maps = param_names.param_maps(config)
  if set(stores) != set(maps):
    missing = sorted("/".join(p) for p in set(maps) - set(stores))
    extra = sorted("/".join(p) for p in set(stores) - set(maps))
    raise ConversionError(f"{ckpt}: parameters do not match its model_config (missing {missing}, "
                          f"unexpected {extra})")
  for path, m in maps.items():
    if tuple(stores[path].shape) != m.shape:
      raise ConversionError(f"{ckpt}: parameter {'/'.join(path)} has shape "
                            f"{list(stores[path].shape)}, model_config implies {list(m.shape)}")

  sources = _tensor_sources(ckpt, maps, stores, files, dtype)
  shards = safetensors_io.plan_shards(sources, max_bytes)
  names = safetensors_io.shard_names(len(shards))
  written = []
  out_dtype = jnp.dtype(sources[0].dtype).name
  tokens, tokenizer, eot_id = _special_tokens(ckpt, config_json, config, blob)
  # config.json goes last: on GCS (no rename) it is what marks the directory complete, and every
  # reader of a Hugging Face directory (ours, transformers) requires it.
  with paths.staged_directory(hf_dir, complete_when=CONFIG_FILE) as out:
    with orbax_stream.no_gc():
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
    config_out = model_config_to_hf_config(config, dtype=out_dtype, special_tokens=tokens)
    (out / CONFIG_FILE).write_text(json.dumps(config_out, indent=2) + "\n")
    written.append(CONFIG_FILE)
  return written
