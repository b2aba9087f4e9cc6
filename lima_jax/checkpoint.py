"""One on-disk layout for every lima_jax checkpoint, written and read through Orbax.

A checkpoint is a directory of Orbax items:

  params/        the parameter pytree (plain nested dict, see lima_jax.model), Orbax PyTree format
  model_config/  JSON: the ModelConfig fields
  tokenizer/     JSON: the tokenizer blob (its files, base64, and the EOT text); optional

Training step directories (`WORKDIR/checkpoints/<step>/`) add `train_state/` and, where an exact
resume needs it, `opt_state/` (the AdamW moments, twice the parameters' bytes), so a converted
checkpoint and a training checkpoint are read by the same functions. Orbax writes to a temporary
directory and renames it on success (on GCS, which cannot rename, it writes in place and
commit_success.txt last): a crash never leaves one that looks complete.

By default (`train.keep_optimizer_state="latest"`) only the newest finished step keeps
`opt_state/`: once a newer save is committed, older steps lose theirs (`prune_optimizer_state`),
so every epoch stays selectable by its parameters at a third of the bytes, and there is always
one step to resume from exactly, even after a crash between the two.
"""

import re
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from lima_jax import paths
from lima_jax.model import ModelConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"
TOKENIZER = "tokenizer"
CHECKPOINTS_SUBDIR = "checkpoints"
HF_CONFIG = "config.json"  # What makes a directory a Hugging Face model (see `is_hf_dir`).
# Orbax's mark of a finished save where it cannot rename (object stores): written last.
ORBAX_COMMIT_FILE = "commit_success.txt"


def _path(path) -> epath.Path:
  # Not epath's .absolute(): it turns gs://B/x into $PWD/gs:/B/x.
  return paths.absolute(path)


def is_checkpoint(path) -> bool:
  """True for a finished lima_jax checkpoint directory: params and model_config present, and
  Orbax's own mark of a finished save (locally the final name; on GCS, where nothing is renamed,
  its commit_success.txt), so a save cut short is never read as a checkpoint."""
  path = _path(path)
  if not ((path / PARAMS).is_dir() and (path / MODEL_CONFIG).is_dir()):
    return False
  return bool(ocp.step.is_path_finalized(path))


def is_hf_dir(path) -> bool:
  """A Hugging Face model directory (its config.json beside the weights), local or gs://."""
  return (_path(path) / HF_CONFIG).is_file()


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
  if (path / PARAMS).is_dir() and (path / MODEL_CONFIG).is_dir():
    raise FileNotFoundError(
        f"{path}: an unfinished save (Orbax never marked it complete; a crash or preemption cut "
        f"it short); use a finished checkpoint, e.g. an earlier step")
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
    checkpointer.save(path, ocp.args.Composite(**items))


def _read_json_item(path: epath.Path, item: str):
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def read_model_config_json(path) -> dict:
  """The model_config item as stored: the ModelConfig fields and any extra keys a writer added."""
  return dict(_read_json_item(resolve(path), MODEL_CONFIG))


def read_model_config(path) -> ModelConfig:
  return ModelConfig.from_dict(read_model_config_json(path))


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
      meta = checkpointer.metadata(path / PARAMS)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.devices()[0]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
        tree)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
  return restored[PARAMS]


# -- Training checkpoints: WORKDIR/checkpoints/<step>/ through an Orbax CheckpointManager. --------

OPT_STATE = "opt_state"
TRAIN_STATE = "train_state"
KEEP_OPTIMIZER_STATE = ("latest", "all")


def checkpoint_manager(workdir, *, keep: int = 0, async_save: bool = True) -> ocp.CheckpointManager:
  """The manager of `WORKDIR/checkpoints/<step>/`; `keep=0` keeps every checkpoint.

  Saves are asynchronous: `save` returns once the arrays are copied to host memory and the
  files are written in the background, into a temporary directory that is renamed (or, on
  object stores, marked with a commit file) only when complete. Stale temporary directories of
  a crashed save are deleted when the manager opens.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or None, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  handlers = {PARAMS: ocp.StandardCheckpointHandler(), OPT_STATE: ocp.StandardCheckpointHandler(),
              MODEL_CONFIG: ocp.JsonCheckpointHandler(), TOKENIZER: ocp.JsonCheckpointHandler(),
              TRAIN_STATE: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(_path(workdir) / CHECKPOINTS_SUBDIR, options=options,
                               item_handlers=handlers)


def save_training(manager: ocp.CheckpointManager, step: int, *, params, opt_state,
                  model_config: ModelConfig, tokenizer_blob: Mapping[str, Any] | None,
                  train_state: Mapping[str, Any]) -> bool:
  """Starts saving step `step` (asynchronously); `train_state` is a JSON-able dict.

  Returns False where this step is already saved (e.g. an epoch end that was also a
  periodic save).
  """
  if step in manager.all_steps():
    return False
  items = {PARAMS: ocp.args.StandardSave(params), OPT_STATE: ocp.args.StandardSave(opt_state),
           MODEL_CONFIG: ocp.args.JsonSave(model_config.to_dict()),
           TRAIN_STATE: ocp.args.JsonSave(dict(train_state))}
  if tokenizer_blob is not None:
    items[TOKENIZER] = ocp.args.JsonSave(dict(tokenizer_blob))
  return manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_training(manager: ocp.CheckpointManager, step: int, *, params_target,
                     opt_state_target=None) -> tuple[Any, Any, dict]:
  """(params, opt_state, train_state dict) of step `step`, restored straight into the shards
  that the targets' shardings name, whatever mesh the checkpoint was saved from.

  With `opt_state_target=None` the optimizer state is not read (opt_state is None): for steps
  whose `opt_state/` was pruned, or callers that need only the weights.
  """
  items = {PARAMS: ocp.args.StandardRestore(params_target), TRAIN_STATE: ocp.args.JsonRestore()}
  if opt_state_target is not None:
    step_dir = _path(manager.directory) / str(step)
    if not has_optimizer_state(step_dir):
      raise FileNotFoundError(f"{step_dir}: no {OPT_STATE}/ item (pruned: train.keep_optimizer_state"
                              f"=latest keeps it only in the newest step); resume from a step that has it")
    items[OPT_STATE] = ocp.args.StandardRestore(opt_state_target)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  opt_state = restored[OPT_STATE] if OPT_STATE in items else None
  return restored[PARAMS], opt_state, restored[TRAIN_STATE]


def has_optimizer_state(path) -> bool:
  """True where a finished step directory still holds its optimizer state (an exact resume point)."""
  path = _path(path)
  return is_checkpoint(path) and (path / OPT_STATE).is_dir()


def finished_steps(manager: ocp.CheckpointManager) -> list[int]:
  """Steps of `WORKDIR/checkpoints/` whose save finished, oldest first."""
  return [s for s, _ in _step_dirs(_path(manager.directory))]


def resumable_steps(manager: ocp.CheckpointManager) -> list[int]:
  """Finished steps that keep `opt_state/` (an exact resume needs it), oldest first."""
  return [s for s, p in _step_dirs(_path(manager.directory)) if (p / OPT_STATE).is_dir()]


def prune_optimizer_state(manager: ocp.CheckpointManager) -> list[int]:
  """Deletes `opt_state/` from every finished step older than the newest one that has it.

  Call it only when no save is in flight (after `manager.wait_until_finished()`): a step counts
  once Orbax has committed it, so a crash at any point leaves at least one resumable step. Only
  process 0 deletes (on gs:// this removes the objects under the item's prefix); the step's
  parameters, config, tokenizer and train state stay, and `is_checkpoint`, `restore_params` and
  Orbax's restore of those items accept it as before. Returns the pruned steps.
  """
  keep = resumable_steps(manager)
  if jax.process_index() != 0 or len(keep) < 2:
    return []
  pruned = []
  for step in keep[:-1]:
    item = _path(manager.directory) / str(step) / OPT_STATE
    try:
      item.rmtree()
    except FileNotFoundError:  # Orbax's own max_to_keep deletion got there first.
      continue
    pruned.append(step)
  return pruned


def read_train_state(path) -> dict:
  """The JSON train state (step, epoch, rng, data iterator state, config) of a training checkpoint."""
  path = resolve(path)
  if not (path / TRAIN_STATE).is_dir():
    raise FileNotFoundError(f"{path}: no {TRAIN_STATE}/ item; not a training checkpoint")
  return _read_json_item(path, TRAIN_STATE)
