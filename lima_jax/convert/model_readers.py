"""Blocks of any model lima_jax loads, LoRA checkpoints merged into their base on the fly.

A LoRA training checkpoint holds only the trainable tree (`lima_jax.lora`) as its `params`,
and its model_config names the base (`lora.base`: a Hugging Face directory, a lima_jax
checkpoint, itself possibly LoRA, or "" for a random init from `lora.base_seed`). Everything
here reads the base block by block, so a merged model is produced one layer at a time:

  * `load_merged_params`: the merged weights straight into device shards (`init_from`,
    `lima_jax.load_pretrained`, evaluation and chat);
  * `merged_stores`: the merged weights as lazy stores for `orbax_to_hf`.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax import checkpoint
from lima_jax import lora as lora_lib
from lima_jax import model as model_lib
from lima_jax.convert import hf_reader
from lima_jax.convert import orbax_stream


def _full_index(index, shape: Sequence[int]) -> tuple[slice, ...]:
  """`index` (ints, slices, possibly short) as one concrete slice per dimension."""
  index = index if isinstance(index, tuple) else (index,)
  index = index + (slice(None),) * (len(shape) - len(index))
  out = []
  for i, n in zip(index, shape):
    if isinstance(i, (int, np.integer)):
      out.append(slice(int(i), int(i) + 1))
    else:
      out.append(slice(*i.indices(n)))
  return tuple(out)


class _Reader:
  """Blocks of a model's parameters in lima_jax's layout: `read(path, index)` gives the float32
  block at `index` (one slice per dimension); `config` is the model's ModelConfig."""

  config: model_lib.ModelConfig

  def read(self, path: tuple[str, ...], index: tuple[slice, ...]) -> np.ndarray:
    raise NotImplementedError


class _HFReader(_Reader):
  def __init__(self, directory: str):
    self._hf = hf_reader.HFCheckpoint(directory)
    self.config = self._hf.model_config

  def read(self, path, index):
    return self._hf.read(path, index, np.float32)


class _OrbaxReader(_Reader):
  def __init__(self, ckpt):
    self._stores = orbax_stream.open_params(ckpt)
    self.config = checkpoint.read_model_config(ckpt)

  def read(self, path, index):
    return np.asarray(self._stores[path][index].read().result(), np.float32)


class _RandomReader(_Reader):
  """The random base of a LoRA run that started from no weights (rebuilt from its seed)."""

  def __init__(self, config: model_lib.ModelConfig, seed: int):
    self.config = config
    params = model_lib.lora_base_params(config, seed)
    self._params = {tuple(k.key for k in p): np.asarray(x, np.float32)
                    for p, x in jax.tree_util.tree_leaves_with_path(params)}

  def read(self, path, index):
    return self._params[path][index]


class _MergedReader(_Reader):
  """A LoRA checkpoint's model with its adapters folded in: base + scale * A @ B, the base's
  vocabulary grown to the checkpoint's (new rows at the base's mean) and the trained rows set."""

  def __init__(self, ckpt, lora_config_model: model_lib.ModelConfig):
    mc = lora_config_model
    self._lora_model = mc
    self.config = lora_lib.base_config(mc)
    self._base = open_base(mc)
    trainable = checkpoint.restore_params(ckpt)
    self._trainable = jax.tree.map(lambda x: np.asarray(x, np.float32), trainable)
    self._tables: dict[tuple[str, ...], np.ndarray] = {}

  def _table(self, path) -> np.ndarray:
    """The whole embedding or LM head (vocabulary rows are a small part of a model)."""
    if path not in self._tables:
      base_cfg = self._base.config
      old, new = base_cfg.vocab_size, self.config.vocab_size
      padded = self.config.padded_vocab_size
      axis = 0 if path == ("embed", "embedding") else 1
      shapes = model_lib.abstract_params(base_cfg)
      shape = shapes["embed"]["embedding"].shape if axis == 0 else shapes["lm_head"].shape
      table = np.moveaxis(self._base.read(path, _full_index((), shape)), axis, 0)
      out = np.zeros((padded,) + table.shape[1:], np.float32)
      keep = min(old, table.shape[0])
      out[:keep] = table[:keep]
      if new > old:
        out[old:new] = table[:old].mean(axis=0)
      ids = np.asarray(self._lora_model.lora.token_ids, np.int64)
      rows = self._trainable.get("rows", {})
      name = "embedding" if axis == 0 else "lm_head"
      if name in rows and ids.size:
        out[ids] = rows[name] if axis == 0 else rows[name].T
      self._tables[path] = np.moveaxis(out, 0, axis)
    return self._tables[path]

  def read(self, path, index):
    if path in (("embed", "embedding"), ("lm_head",)):
      return self._table(path)[index]
    block = self._base.read(path, index)
    if path[0] != "layers" or path[-1] not in lora_lib.TARGETS:
      return block
    module, target = path[1], path[2]
    ab = self._trainable.get("layers", {}).get(module, {}).get("lora", {}).get(target)
    if ab is None:
      return block
    # Only the block's part of A (its input dimensions) and B (its output ones): a device's
    # shard of a stacked weight costs that shard's memory, not the whole stack's.
    n_in = lora_lib.num_input_dims(target)
    a = ab["a"][(index[0],) + tuple(index[1:1 + n_in]) + (slice(None),)]
    b = ab["b"][(index[0], slice(None)) + tuple(index[1 + n_in:])]
    return block + np.asarray(lora_lib.merge_delta(self._lora_model, target, a, b))


def open_base(lora_model_config: model_lib.ModelConfig) -> _Reader:
  """A reader of the base that a LoRA model adapts."""
  lc = lora_model_config.lora
  if not lc.base:
    return _RandomReader(lora_lib.base_config(lora_model_config), lc.base_seed)
  return open_model(lc.base)


def open_model(path: str) -> _Reader:
  """A reader of any model lima_jax loads: a Hugging Face directory, a checkpoint, a LoRA one."""
  if checkpoint.is_hf_dir(path):
    return _HFReader(path)
  ckpt = checkpoint.resolve(path)
  config = checkpoint.read_model_config(ckpt)
  if config.lora is not None:
    return _MergedReader(ckpt, config)
  return _OrbaxReader(ckpt)


def load_merged_params(path, shardings: Any = None, dtype: str = "float32") -> dict:
  """The merged parameters of a LoRA checkpoint, each device's block computed from the base.

  `shardings`: a tree like `model.abstract_params` of the merged model; default one device.
  """
  reader = open_model(path)
  config = reader.config.replace(param_dtype=jnp.dtype(dtype).name)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out: dict = {}
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(model_lib.abstract_params(config)):
    key = tuple(k.key for k in keypath)
    target = default
    if shardings is not None:
      target = shardings
      for k in key:
        target = target[k]
    array = jax.make_array_from_callback(
        leaf.shape, target,
        lambda index, key=key, shape=leaf.shape: reader.read(
            key, _full_index(index, shape)).astype(jnp.dtype(dtype)))
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = array
  return out


class _ReadResult:
  def __init__(self, value):
    self._value = value

  def result(self):
    return self._value


class _Block:
  def __init__(self, value):
    self._value = value

  def read(self):
    return _ReadResult(self._value)


class _Dtype:
  def __init__(self, dtype):
    self.numpy_dtype = np.dtype(dtype)


class MergedStore:
  """One merged parameter with the slice-then-read interface of an open TensorStore."""

  def __init__(self, reader: _Reader, path: tuple[str, ...], shape: tuple[int, ...], dtype):
    self._reader, self._path = reader, path
    self.shape = tuple(shape)
    self.dtype = _Dtype(dtype)

  def __getitem__(self, index):
    squeeze = tuple(i for i, x in enumerate(index if isinstance(index, tuple) else (index,))
                    if isinstance(x, (int, np.integer)))
    block = self._reader.read(self._path, _full_index(index, self.shape))
    return _Block(np.squeeze(block, axis=squeeze).astype(self.dtype.numpy_dtype))


def merged_stores(path) -> tuple[dict[tuple[str, ...], MergedStore], model_lib.ModelConfig]:
  """(merged parameters as lazy stores, their ModelConfig): what `export_hf.orbax_to_hf` writes."""
  reader = open_model(path)
  config = reader.config
  stores = {}
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(model_lib.abstract_params(config)):
    key = tuple(k.key for k in keypath)
    stores[key] = MergedStore(reader, key, leaf.shape, leaf.dtype)
  return stores, config
