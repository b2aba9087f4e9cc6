"""LoRA checkpoints on disk: their base, the merged model, and Hugging Face PEFT adapters.

A LoRA training checkpoint holds only the trainable tree (`lima_jax.lora`) as its `params`,
and its model_config names the base (`lora.base`: a Hugging Face directory, a lima_jax
checkpoint, itself possibly LoRA, or "" for a random init from `lora.base_seed`). Everything
here reads the base block by block, so a merged model is produced one layer at a time:

  * `load_merged_params`: the merged weights straight into device shards (`init_from`,
    `lima_jax.load_pretrained`, evaluation and chat);
  * `merged_stores`: the merged weights as lazy stores for `convert.orbax_to_hf`;
  * `save_peft`: adapter_config.json + adapter_model.safetensors, which
    `peft.PeftModel.from_pretrained` loads onto the base (with the EOT row, see docs/training.md).
"""

import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax import checkpoint
from lima_jax import lora as lora_lib
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import safetensors_io
from lima_jax import train_step

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Hugging Face module paths of the adapted projections.
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


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
    from lima_jax import convert  # pylint: disable=g-import-not-at-top
    self._hf = convert.HFCheckpoint(directory)
    self.config = self._hf.model_config

  def read(self, path, index):
    return self._hf.read(path, index, np.float32)


class _OrbaxReader(_Reader):
  def __init__(self, ckpt):
    from lima_jax import convert  # pylint: disable=g-import-not-at-top
    self._stores = convert.open_params(ckpt)
    self.config = checkpoint.read_model_config(ckpt)

  def read(self, path, index):
    return np.asarray(self._stores[path][index].read().result(), np.float32)


class _RandomReader(_Reader):
  """The random base of a LoRA run that started from no weights (rebuilt from its seed)."""

  def __init__(self, config: model_lib.ModelConfig, seed: int):
    self.config = config
    params = train_step.base_init(config, seed)
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


def is_lora_checkpoint(path) -> bool:
  if checkpoint.is_hf_dir(path):
    return False
  return checkpoint.read_model_config(path).lora is not None


def merged_config(path) -> model_lib.ModelConfig:
  return lora_lib.base_config(checkpoint.read_model_config(path))


def load_merged_params(path, shardings: Any = None, dtype: str = "float32") -> dict:
  """The merged parameters of a LoRA checkpoint, each device's block computed from the base.

  `shardings`: a tree like `model.abstract_params(merged_config(path))`; default one device.
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
  """(merged parameters as lazy stores, their ModelConfig): what `convert.orbax_to_hf` writes."""
  reader = open_model(path)
  config = reader.config
  stores = {}
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(model_lib.abstract_params(config)):
    key = tuple(k.key for k in keypath)
    stores[key] = MergedStore(reader, key, leaf.shape, leaf.dtype)
  return stores, config


# -- Hugging Face PEFT. -------------------------------------------------------------------------


def peft_tensors(model_config: model_lib.ModelConfig, trainable: Mapping) -> dict[str, np.ndarray]:
  """PEFT's state dict of the adapters: lora_A.weight [r, in] and lora_B.weight [out, r] per
  layer and projection, and each trained table's rows (`token_adapter.trainable_tokens_delta`,
  which PEFT writes over the base rows at `trainable_token_indices`)."""
  r = model_config.lora.rank
  out = {}
  for module, sub in trainable.get("layers", {}).items():
    for target, ab in sub["lora"].items():
      a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
      for i in range(model_config.n_layers):
        prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[module]}.{target}"
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  rows = trainable.get("rows", {})
  if "embedding" in rows:
    out["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = (
        np.ascontiguousarray(np.asarray(rows["embedding"], np.float32)))
  if "lm_head" in rows:
    out["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] = (
        np.ascontiguousarray(np.asarray(rows["lm_head"], np.float32).T))
  return out


def peft_config(model_config: model_lib.ModelConfig, base_name: str | None) -> dict:
  """adapter_config.json: a LoraConfig that computes what lima_jax's adapters compute."""
  lc = model_config.lora
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
      "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
      "target_modules": list(lc.targets), "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None,
  }
  if lc.token_ids:
    ids = list(lc.token_ids)
    config["trainable_token_indices"] = (
        {"embed_tokens": ids} if model_config.tie_embeddings else {"embed_tokens": ids, "lm_head": ids})
  return config


def save_peft(ckpt_dir, peft_dir) -> list[str]:
  """Writes a LoRA checkpoint (or a workdir's newest) as a Hugging Face PEFT adapter directory.

  Files: adapter_config.json, adapter_model.safetensors (float32, as PEFT keeps adapters) and,
  when the checkpoint carries one, the tokenizer (with EOT). Atomic: a temporary directory
  renamed at the end. Returns the written file names.
  """
  from lima_jax import convert  # pylint: disable=g-import-not-at-top
  try:
    ckpt = checkpoint.resolve(ckpt_dir)
  except FileNotFoundError as e:
    raise convert.ConversionError(str(e)) from e
  config = checkpoint.read_model_config(ckpt)
  if config.lora is None:
    raise convert.ConversionError(
        f"{ckpt}: not a LoRA checkpoint (its model_config has no lora section); export a full "
        f"model with orbax-to-hf instead")
  tensors = peft_tensors(config, checkpoint.restore_params(ckpt))
  base = config.lora.base
  base_name = base if base and checkpoint.is_hf_dir(base) else None
  blob = checkpoint.read_tokenizer_blob(ckpt)
  written = []
  # adapter_config.json goes last: on GCS (no rename) it is what marks the directory complete.
  with paths.staged_directory(peft_dir, complete_when=ADAPTER_CONFIG) as tmp:
    sources = [safetensors_io.TensorSource(name, np.dtype(np.float32), tuple(x.shape),
                                           lambda x=x: [x])
               for name, x in sorted(tensors.items())]
    safetensors_io.write_file(tmp / ADAPTER_WEIGHTS, sources)
    written.append(ADAPTER_WEIGHTS)
    if blob is not None:
      from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
      written += [p.name for p in tokenizer_lib.load_tokenizer_from_blob(blob).save_files(tmp)]
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config, base_name), indent=2) + "\n")
    written.append(ADAPTER_CONFIG)
  return written


def adapter_bytes(model_config: model_lib.ModelConfig) -> int:
  """Bytes of a LoRA checkpoint's trainable tree (float32)."""
  return 4 * lora_lib.num_trainable(model_config)

