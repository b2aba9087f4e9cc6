"""A Hugging Face model directory (config.json + safetensors), checked, and read a block at a time.

A block of a lima_jax parameter is read from only the Hugging Face rows it needs
(`param_names.ParamMap.read`), so `load_hf_params` fills each device's shard straight from the
files (`jax.make_array_from_callback`): that is how training starts from a 65B model.
"""

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lima_jax import paths
from lima_jax import safetensors_io
from lima_jax.convert import param_names
from lima_jax.convert.hf_config import ARCHITECTURES
from lima_jax.convert.hf_config import CONFIG_FILE
from lima_jax.convert.hf_config import ConversionError
from lima_jax.convert.hf_config import hf_config_to_model_config
from lima_jax.convert.hf_config import INDEX_FILE
from lima_jax.convert.hf_config import read_json
from lima_jax.convert.hf_config import SINGLE_FILE
from lima_jax.model import ModelConfig

# Buffers some older checkpoints saved next to the weights; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFCheckpoint:
  """config.json + safetensors (sharded with model.safetensors.index.json, or single), checked.

  Construction reads only headers: every tensor the config implies must exist with the right
  shape and a floating dtype, and no unexpected tensor may be present, so a bad input fails
  before anything is written.
  """

  def __init__(self, directory: str | os.PathLike):
    self.dir = paths.path(directory)
    if not self.dir.is_dir():
      raise ConversionError(f"{self.dir}: no such directory")
    self.config_json = read_json(self.dir / CONFIG_FILE)
    self.model_config = hf_config_to_model_config(self.dir / CONFIG_FILE)
    self._where = self._weight_map()
    self.maps = param_names.param_maps(self.model_config)
    self._check_tensors()
    stored = self.source_dtype(("embed", "embedding"))
    self.model_config = self.model_config.replace(
        param_dtype="float32" if stored == np.float64 else stored.name)

  def _weight_map(self) -> dict[str, safetensors_io.SafetensorsFile]:
    """tensor name -> the shard that holds it (headers read and checked)."""
    index_path, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
    if index_path.is_file():
      index = read_json(index_path)
      weight_map = index.get("weight_map")
      if not isinstance(weight_map, Mapping) or not weight_map:
        raise ConversionError(f"{index_path}: no weight_map")
      files = {}
      for name in sorted(set(weight_map.values())):
        if not (self.dir / name).is_file():
          raise ConversionError(f"{index_path}: lists shard {name}, which is not in {self.dir}")
        files[name] = self._open(self.dir / name)
      where = {}
      for tensor, name in weight_map.items():
        if tensor not in files[name].tensors:
          raise ConversionError(f"{self.dir / name}: tensor {tensor} is missing (listed in {INDEX_FILE})")
        where[tensor] = files[name]
      return where
    if single.is_file():
      f = self._open(single)
      return dict.fromkeys(f.tensors, f)
    found = sorted(p.name for p in self.dir.iterdir())
    hint = (" PyTorch .bin weights are not read: load them in transformers and save with "
            "save_pretrained(dir, safe_serialization=True)." if any(n.endswith(".bin") for n in found) else "")
    raise ConversionError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found[:10]}).{hint}")

  @staticmethod
  def _open(path: epath.Path) -> safetensors_io.SafetensorsFile:
    try:
      return safetensors_io.SafetensorsFile(path)
    except ValueError as e:
      raise ConversionError(str(e)) from e

  def _check_tensors(self) -> None:
    c = self.model_config
    expected = {}
    for m in self.maps.values():
      for name in m.hf_names():
        expected[name] = m
    for name, m in expected.items():
      if name not in self._where:
        where = self.dir / (INDEX_FILE if (self.dir / INDEX_FILE).is_file() else SINGLE_FILE)
        raise ConversionError(f"{where}: tensor {name} is missing (config.json: num_hidden_layers="
                              f"{c.n_layers}, tie_word_embeddings={c.tie_embeddings})")
      f = self._where[name]
      info = f.tensors[name]
      if info.numpy_dtype is None:
        raise ConversionError(f"{f.path}: tensor {name} has dtype {info.dtype}; only float32, "
                              f"float16 and bfloat16 weights are supported (no quantized ones)")
      if info.shape != m.hf_shape:
        raise ConversionError(
            f"{f.path}: tensor {name} has shape {list(info.shape)} but {CONFIG_FILE} implies "
            f"{list(m.hf_shape)} (vocab_size={c.vocab_size}, hidden_size={c.d_model}, heads="
            f"{c.n_heads}, kv_heads={c.kv_heads}, head_dim={c.dim_per_head}, "
            f"intermediate_size={c.mlp_dim})")
    for m in self.maps.values():
      dtypes = {self._where[n].tensors[n].dtype for n in m.hf_names()}
      if len(dtypes) > 1:
        raise ConversionError(f"{self.dir}: the {m.hf_name} tensors mix dtypes {sorted(dtypes)}; "
                              f"pass --dtype to convert them to one")
    tied_head = "lm_head.weight" if c.tie_embeddings else None
    for name in self._where:
      if name not in expected and name != tied_head and not name.endswith(_IGNORED_SUFFIXES):
        raise ConversionError(f"{self._where[name].path}: unexpected tensor {name}; not a plain "
                              f"{ARCHITECTURES[c.model_type]} as {CONFIG_FILE} describes it")

  def source_dtype(self, path: tuple[str, ...]) -> np.dtype:
    name = self.maps[path].hf_names()[0]
    return self._where[name].tensors[name].numpy_dtype

  def row_reader(self, name: str) -> Callable[[int, int], np.ndarray]:
    f = self._where[name]
    return lambda start, stop: f.read_rows(name, start, stop)

  def read(self, path: tuple[str, ...], index: Sequence[slice], dtype=None,
           fill: param_names.RowFill | None = None, out_map: param_names.ParamMap | None = None) -> np.ndarray:
    """Block `index` (slices over the full lima_jax shape) of one parameter.

    `out_map` (default: the source's own map) may pad the vocabulary further (a grown one).
    """
    m = self.maps[path]
    target = out_map or m
    dtype = np.dtype(dtype or self.source_dtype(path))
    shape = target.shape
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    read_map = dataclasses.replace(target, hf_rows=m.hf_rows)
    if not target.layers:
      return read_map.read(self.row_reader(m.hf_name), index, dtype, fill, m.hf_name)
    layers = np.arange(target.layers)[index[0]]
    sub = index[1:]
    names = m.hf_names()
    first = read_map.read(self.row_reader(names[layers[0]]), sub, dtype, fill, names[layers[0]])
    if layers.size == 1:  # One layer a chunk, as the converter writes: no copy.
      return first[None]
    out = np.empty((layers.size,) + first.shape, dtype)
    out[0] = first
    for j, i in enumerate(layers[1:], start=1):
      out[j] = read_map.read(self.row_reader(names[i]), sub, dtype, fill, names[i])
    return out

  def byte_range(self, path: tuple[str, ...], index: Sequence[slice], dtype=None,
                 fill: param_names.RowFill | None = None,
                 out_map: param_names.ParamMap | None = None) -> paths.FileRange | None:
    """Where the bytes of block `index` (as `read` would give it, in the map's storage order)
    lie in the files, when they are whole rows of one tensor kept in its dtype: those rows, then
    zeros for rows past the tensor's end (a padded vocabulary). None when the block must be
    made (a cast, a new token's row, a block across layers or columns): `read` it instead."""
    m = self.maps[path]
    target = out_map or m
    if dtype is not None and np.dtype(dtype) != self.source_dtype(path):
      return None
    index = tuple(index) + (slice(None),) * (len(target.shape) - len(index))
    name = m.hf_name
    if target.layers:
      layers = np.arange(target.layers)[index[0]]
      if layers.size != 1:
        return None
      name, index = m.hf_names()[int(layers[0])], index[1:]
    rows = target.block_rows(index)
    if rows is None:
      return None
    start, stop = rows
    if fill is not None and fill.start < stop and start < fill.stop:
      return None
    f = self._where[name]
    info = f.tensors[name]
    row_bytes = math.prod(info.shape[1:]) * info.numpy_dtype.itemsize
    real = max(0, min(stop, m.hf_rows) - start)
    return paths.FileRange(f.path, info.begin + start * row_bytes, real * row_bytes)

  def row_mean(self, path: tuple[str, ...]) -> np.ndarray:
    """Mean over the vocabulary rows (float32), streamed: the initial row of a new token."""
    m = self.maps[path]
    read_rows = self.row_reader(m.hf_name)
    total = np.zeros(math.prod(m.col_shape), np.float64)
    row_bytes = math.prod(m.col_shape) * 4
    for start, stop in safetensors_io.iter_row_blocks(m.hf_rows, row_bytes):
      total += read_rows(start, stop).astype(np.float32).sum(axis=0, dtype=np.float64)
    return (total / m.hf_rows).astype(np.float32)

  def special_tokens(self) -> dict[str, Any]:
    return {k: self.config_json.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if self.config_json.get(k) is not None}


def load_hf_params(hf_dir: str | os.PathLike, shardings: Any = None,
                   dtype: str | None = "float32") -> tuple[dict, ModelConfig]:
  """(params, model_config) of a Hugging Face directory, each device's shard read from disk.

  `shardings` is a tree like the parameters' (e.g. `sharding.tree_shardings(...)` for
  `model.abstract_params(config)` of `hf_config_to_model_config(hf_dir)`); default: the first
  device. Each host reads only the rows its devices hold, one layer at a time, so no host ever
  holds the whole model. `dtype=None` keeps the files' dtypes. The vocabulary is the
  checkpoint's; grow it for EOT with `add_eot_row` (inside jit, with the new shardings).
  """
  hf = HFCheckpoint(hf_dir)
  config = hf.model_config
  if dtype is not None:
    config = config.replace(param_dtype=jnp.dtype(dtype).name)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params: dict = {}
  for path, m in hf.maps.items():
    target = default if shardings is None else param_names.get_path(shardings, path)
    want = jnp.dtype(dtype) if dtype is not None else hf.source_dtype(path)
    array = jax.make_array_from_callback(
        m.shape, target, lambda index, path=path, want=want: hf.read(path, index, want))
    param_names.set_path(params, path, array)
  return params, config
