"""The checkpoint chosen among a training workdir's epochs, as the LIMA authors chose theirs.

`lima-select` judges the dev answers of each kept epoch and writes its choice to
WORKDIR/selected_checkpoint.json (atomically); `lima-evaluate --checkpoint WORKDIR` then answers
with that epoch's checkpoint instead of the newest, and says so. The epochs a workdir holds are
its finished step checkpoints whose train state is at an epoch's end.
"""

import dataclasses
import json
import re
from typing import Callable

from lima_jax import checkpoint
from lima_jax import errors
from lima_jax import metrics
from lima_jax import paths
from lima_jax import records

SELECTION_FILE = "selected_checkpoint.json"


@dataclasses.dataclass(frozen=True)
class EpochCheckpoint:
  epoch: int
  step: int
  path: str


def epoch_checkpoints(workdir: str) -> list[EpochCheckpoint]:
  """The workdir's finished checkpoints that end an epoch, by epoch."""
  directory = paths.path(workdir) / checkpoint.CHECKPOINTS_SUBDIR
  if not directory.is_dir():
    raise errors.InputError(f"--workdir {workdir}: no {checkpoint.CHECKPOINTS_SUBDIR}/ (not a training workdir)")
  found = []
  for step_dir in directory.iterdir():
    if not re.fullmatch(r"\d+", step_dir.name) or not checkpoint.is_checkpoint(step_dir):
      continue
    try:
      epoch = float(checkpoint.read_train_state(step_dir).get("epoch", -1))
    except FileNotFoundError:
      continue  # An exported model without a train state: no epoch to name it by.
    if epoch >= 1 and epoch.is_integer():
      found.append(EpochCheckpoint(int(epoch), int(step_dir.name), str(step_dir)))
  return sorted(found, key=lambda c: c.epoch)


def dev_losses(workdir: str) -> dict[int, float]:
  """step -> dev loss, from the workdir's metrics.jsonl (empty where training ran no dev split)."""
  file = paths.path(workdir) / metrics.METRICS_FILE
  losses = {}
  if file.is_file():
    for line in file.read_text().splitlines():
      record = json.loads(line) if line.strip() else {}
      if "dev_loss" in record:
        losses[int(record["step"])] = float(record["dev_loss"])
  return losses


def dev_prompts(dev_path: str) -> list[dict]:
  """A dev split's conversations as prompts: each without its last (assistant) turn, ids its line."""
  try:
    conversations = records.read_jsonl(dev_path, kind=records.TRAIN)
  except (records.DataError, FileNotFoundError) as e:
    raise errors.InputError(str(e)) from None
  return [{"id": c.line, "conversations": list(c.prompt_turns)} for c in conversations]


def write_selection(workdir: str, choice: dict) -> str:
  path = str(paths.path(workdir) / SELECTION_FILE)
  paths.write_text_atomic(path, json.dumps(choice, indent=2) + "\n")
  return path


def resolve(path: str, log: Callable[[str], None]) -> str:
  """`path`, or where it is a workdir that lima-select chose in, the chosen epoch's checkpoint."""
  file = paths.path(path) / SELECTION_FILE
  if not file.is_file():
    return path
  try:
    choice = json.loads(file.read_text())
    chosen = paths.path(path) / checkpoint.CHECKPOINTS_SUBDIR / str(int(choice["step"]))
  except (ValueError, KeyError, TypeError):
    raise errors.InputError(f"{file}: not lima-select's choice (expected JSON with 'epoch' and 'step'); "
                            "rerun lima-select or delete the file") from None
  if not checkpoint.is_checkpoint(chosen):
    raise errors.InputError(f"{file}: the chosen step {choice['step']} is no longer in {chosen.parent}; "
                            "rerun lima-select or delete the file")
  log(f"using epoch {choice.get('epoch')} (step {choice['step']}), the checkpoint lima-select chose in {file}")
  return str(chosen)
