"""What a training workdir holds, and whether a new run may continue it.

A workdir holds one run: its checkpoints (each with the config it was saved under, in its
train_state item) and `run_config.json`, the resolved config of the newest run started there
(for people and tools; the checkpoints stay the record of what was trained). A rerun resumes it
only when it trains the same model (`model.init_from`, the architecture) with the same recipe
(optimizer, schedule, batch, data, LoRA, seed); what only changes how the run executes, logs,
saves or evaluates (`RUNTIME_FIELDS`) may differ. Anything else is refused in one line
(`errors.InputError`) naming the fields, since resuming would splice two runs into one: another
model's weights cannot load (Orbax's "tree structures do not match"), another schedule makes the
lr jump, and a finished run would be reported "already finished" for a run never made.

Changing `train.epochs` or `train.max_steps` is refused too: LIMA's lr falls linearly over the
whole run, so a longer run from a finished one would first raise the lr again. To train on, a new
workdir starts a fresh schedule from the weights (`--config.model.init_from=OLD_WORKDIR`).

Not `config.json`: that name makes a directory a Hugging Face model (`checkpoint.is_hf_dir`), and
a workdir is also a model path (`--checkpoint=WORKDIR`, `model.init_from=WORKDIR`).
"""

import json
from typing import Mapping

import jax

from lima_jax import checkpoint as ckpt_lib
from lima_jax import errors
from lima_jax import paths

CONFIG_FILE = "run_config.json"
SCHEDULE_FIELDS = ("train.epochs", "train.max_steps")
# Fields a rerun may change: how the run executes, logs, saves and evaluates, not what it trains.
# A name ending in "." covers its whole section.
RUNTIME_FIELDS = (
    "mesh.", "sampling.",
    "model.dtype", "model.remat_policy", "model.attention",
    "data.dev_path", "data.test_path", "data.worker_count",
    "train.micro_batches", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.keep_optimizer_state", "train.keep_epochs",
    "train.dev_generations", "train.dev_max_new_tokens", "train.peak_flops_per_device",
    "train.stop_at_step", "train.distributed", "train.check_memory",
)
_MAX_NAMED = 4  # Differences named in the refusal; the rest are counted.


def json_config(config) -> dict:
  """A config as the JSON-able dict that checkpoints and run_config.json store."""
  return json.loads(config.to_json_best_effort())


def config_differences(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
  """`field: old -> new` for every leaf that differs between two JSON configs."""
  return [f"{name}: {a!r} -> {b!r}" for name, a, b in _differing_fields(saved, current, prefix)]


def _differing_fields(saved: Mapping, current: Mapping, prefix: str = "") -> list[tuple]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _differing_fields(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append((f"{prefix}{key}", a, b))
  return out


def is_runtime_field(name: str) -> bool:
  return any(name.startswith(f) if f.endswith(".") else name == f for f in RUNTIME_FIELDS)


def check_usable(workdir) -> None:
  """InputError (one line) unless `workdir` is a directory this process can list and write,
  or can be created as one."""
  where = f"--workdir={workdir}"
  path = paths.path(workdir)
  try:
    if path.exists() and not path.is_dir():
      raise errors.InputError(f"{where} is a file, not a directory; give a directory (it is "
                              f"created if missing)")
    if paths.is_remote(path):  # gs:// has no directories to make; save_config tests writing.
      return
    path.mkdir(parents=True, exist_ok=True)
    list(path.iterdir())
  except (NotADirectoryError, FileExistsError):
    raise errors.InputError(f"{where}: a part of this path is a file, not a directory; give a "
                            f"directory path") from None
  except OSError as e:  # Permission denied, a read-only or pseudo file system, ...
    raise errors.InputError(f"{where}: cannot use it ({e.strerror or e}); give a directory you can "
                            f"read and write") from None


def held_config(workdir) -> tuple[dict, str] | None:
  """The config of the run the workdir holds, and where it was read: the newest finished
  checkpoint's (what the weights were trained under); None where it holds no checkpoint."""
  directory = paths.path(workdir) / ckpt_lib.CHECKPOINTS_SUBDIR
  if not directory.is_dir():
    return None
  try:
    step_dir = ckpt_lib.resolve(directory)
    config = ckpt_lib.read_train_state(step_dir).get("config")
  except (FileNotFoundError, ValueError):
    return None
  return (config, str(step_dir)) if config else None


def incompatibilities(saved: Mapping, current: Mapping) -> list[tuple]:
  """(field, held, new) for every difference a resume cannot take (not `is_runtime_field`)."""
  return [d for d in _differing_fields(saved, current) if not is_runtime_field(d[0])]


def refusal(workdir, differences: list[tuple], source: str) -> str:
  """The one line that refuses a rerun: what differs and how to start a new workdir."""
  named = "; ".join(f"{name} {held!r} -> {new!r}" for name, held, new in differences[:_MAX_NAMED])
  if len(differences) > _MAX_NAMED:
    named += f" (and {len(differences) - _MAX_NAMED} more)"
  kind = ("another model's run" if any(d[0].startswith("model.") for d in differences)
          else "a run with another recipe")
  advice = f"give a new --workdir for this run (or delete {workdir} to start over)"
  if any(d[0] in SCHEDULE_FIELDS for d in differences):
    advice += (f"; to train on from these weights with a fresh lr schedule, use a new --workdir with "
               f"--config.model.init_from={workdir} (another epochs count would make the lr jump)")
  return (f"--workdir={workdir} holds {kind} (its newest checkpoint, {source}): {named}; resuming "
          f"would mix two runs: {advice}")


def check_compatible(workdir, config) -> dict | None:
  """InputError (`refusal`) where the workdir's run differs from `config` in more than
  `RUNTIME_FIELDS`; returns the held JSON config (None for a new run)."""
  held = held_config(workdir)
  if held is None:
    return None
  saved, source = held
  differences = incompatibilities(saved, json_config(config))
  if differences:
    raise errors.InputError(refusal(workdir, differences, source))
  return saved


def save_config(workdir, config) -> None:
  """run_config.json, atomically (a reader sees the old file or the new one), by process 0."""
  if jax.process_index() != 0:
    return
  text = json.dumps(json_config(config), indent=2, sort_keys=True) + "\n"
  try:
    paths.write_text_atomic(paths.path(workdir) / CONFIG_FILE, text)
  except OSError as e:
    raise errors.InputError(f"--workdir={workdir}: cannot write {CONFIG_FILE} there "
                            f"({e.strerror or e}); give a directory you can write") from None


def prepare(workdir, config) -> dict | None:
  """A run's first look at its workdir: usable, holding no other run, and recording this one's
  config; returns the held config when the run resumes (None when it starts afresh)."""
  check_usable(workdir)
  held = check_compatible(workdir, config)
  save_config(workdir, config)
  return held


def finished_step(workdir, total_steps: int) -> int | None:
  """The newest checkpoint's step when the run is already done, else None: a rerun then stops
  before any peak-FLOP/s measurement or compile."""
  directory = paths.path(workdir) / ckpt_lib.CHECKPOINTS_SUBDIR
  if not directory.is_dir():
    return None
  try:
    step = int(ckpt_lib.resolve(directory).name)
  except (FileNotFoundError, ValueError):
    return None
  return step if step >= total_steps else None
