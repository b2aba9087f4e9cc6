"""One on-disk layout for every lima_jax checkpoint, written and read through Orbax.

A checkpoint is a directory of Orbax items:

  params/        the parameter pytree (plain nested dict, see lima_jax.model), Orbax PyTree format
  model_config/  JSON: the ModelConfig fields
  tokenizer/     JSON: the tokenizer blob (its files, base64, and the EOT text); optional

Training step directories (`WORKDIR/checkpoints/<step>/`) add `opt_state/` and `train_state/`,
so a converted checkpoint and a training checkpoint are read by the same functions. Orbax writes
to a temporary directory and renames it on success: a crash never leaves one that looks complete.
"""

import os
import re
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from lima_jax.model import ModelConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"
TOKENIZER = "tokenizer"
CHECKPOINTS_SUBDIR = "checkpoints"


def _path(path) -> epath.Path:
  return epath.Path(os.fspath(path))


def is_checkpoint(path) -> bool:
  """True for a finished lima_jax checkpoint directory (both params and model_config present)."""
  path = _path(path)
  return (path / PARAMS).is_dir() and (path / MODEL_CONFIG).is_dir()


def _step_dirs(directory: epath.Path) -> list[tuple[int, epath.Path]]:
  if not directory.is_dir():
    return []
  steps = [(int(p.name), p) for p in directory.iterdir() if re.fullmatch(r"\d+", p.name)]
  return sorted((s, p) for s, p in steps if is_checkpoint(p))


def resolve(path) -> epath.Path:
  """The checkpoint directory that `path` names: itself, or the newest step in a workdir.

  Accepts a checkpoint directory, a training workdir (uses WORKDIR/checkpoints/<latest>), or
  the checkpoints directory itself.
  """
  path = _path(path)
  if is_checkpoint(path):
    return path
  for directory in (path / CHECKPOINTS_SUBDIR, path):
    steps = _step_dirs(directory)
    if steps:
      return steps[-1][1]
  raise FileNotFoundError(
      f"{path}: not a lima_jax checkpoint (expected {PARAMS}/ and {MODEL_CONFIG}/ inside it, or a "
      f"training workdir with {CHECKPOINTS_SUBDIR}/<step>/)")


def save_model(path, params: Mapping, model_config: ModelConfig,
               tokenizer_blob: Mapping[str, Any] | None = None) -> None:
  """Writes params + config (+ tokenizer) atomically; refuses to overwrite an existing path."""
  path = _path(path)
  if path.exists():
    raise FileExistsError(f"{path} already exists; choose a new output directory")
  items = {PARAMS: ocp.args.StandardSave(params),
           MODEL_CONFIG: ocp.args.JsonSave(model_config.to_dict())}
  if tokenizer_blob is not None:
    items[TOKENIZER] = ocp.args.JsonSave(dict(tokenizer_blob))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path.absolute(), ocp.args.Composite(**items))


def _read_json_item(path: epath.Path, item: str):
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path.absolute(), ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def read_model_config(path) -> ModelConfig:
  return ModelConfig.from_dict(_read_json_item(resolve(path), MODEL_CONFIG))


def read_tokenizer_blob(path) -> dict | None:
  """The tokenizer stored with the checkpoint, or None if it carries none."""
  path = resolve(path)
  if not (path / TOKENIZER).is_dir():
    return None
  return _read_json_item(path, TOKENIZER)


def restore_params(path, target: Any = None) -> dict:
  """Parameters of a checkpoint as a plain dict.

  `target` is a pytree of jax.ShapeDtypeStruct with `sharding` set (e.g. from
  `jax.eval_shape` + the mesh rules): each host then reads only its own shards, straight onto
  its devices, and dtypes are cast on read. Without it the arrays land on the default device.
  """
  path = resolve(path)
  if target is None:
    with ocp.StandardCheckpointer() as checkpointer:
      meta = checkpointer.metadata(path.absolute() / PARAMS)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.devices()[0]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
        tree)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path.absolute(), ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
  return restored[PARAMS]
