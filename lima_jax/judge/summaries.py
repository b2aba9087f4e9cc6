"""What `lima-compare` reads from judgement files beyond labels: Likert scores, names and x values.

A Likert judgement is `{"id", "score": float}` (`lima-judge likert` writes the mean of a prompt's
sampled answers there), or `"unparsed": true` with no score, counted apart. The ablation figures
plot a file's mean against its number of training examples: the records' `examples` field when
they all carry the same one, else the last number in the file's name (`likert-n2048.jsonl`,
`quantity/2048.jsonl` -> 2048).
"""

import pathlib
import re
from typing import Any, Callable, Sequence

import numpy as np

from lima_jax import errors
from lima_jax import jsonl


def read_judged(path: str, parse: Callable[[dict, str], Any], known_ids: set[str] | None = None,
                unparsed: list[str] | None = None) -> dict:
  """id -> parse(record, "file:line") for every line; ids of `"unparsed": true` lines go to `unparsed`.

  Every line needs an id, seen once, and among `known_ids` when given; an unparsed line (a judge
  reply lima-judge could not read) has no value and is counted apart, never as a tie.
  """
  values: dict = {}
  first_line: dict[str, int] = {}
  for number, record in jsonl.read_objects(path):
    where = f"{path}:{number}"
    if "id" not in record:
      raise errors.InputError(f"{where}: no 'id' field")
    pid = str(record["id"])
    if pid in first_line:
      raise errors.InputError(f"{where}: duplicate id {pid!r} (first on line {first_line[pid]})")
    if known_ids is not None and pid not in known_ids:
      raise errors.InputError(f"{where}: id {pid!r} is not in the prompts file")
    first_line[pid] = number
    if record.get("unparsed") is True:
      if unparsed is not None:
        unparsed.append(pid)
      continue
    values[pid] = parse(record, where)
  if not values:
    raise errors.InputError(f"{path}: no judgements" + (f" ({len(unparsed)} unparsed)" if unparsed else ""))
  return values


def likert_score(record: dict, where: str) -> float:
  score = record.get("score")
  if isinstance(score, bool) or not isinstance(score, (int, float)) or not 1 <= score <= 6:
    raise errors.InputError(f"{where}: score {score!r} is not a number from 1 to 6")
  return float(score)


def mean_with_interval(values: Sequence[float], resamples: int = 10000, seed: int = 0,
                       level: float = 0.95) -> dict[str, float]:
  """The mean with a percentile bootstrap interval over the prompts."""
  data = np.asarray(values, dtype=np.float64)
  rng = np.random.default_rng(seed)
  means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return {"n": len(data), "mean": float(data.mean()), "low": float(low), "high": float(high)}


def examples_of(path: str) -> int | None:
  """The file's number of training examples: the records' `examples` field, else its name's last number."""
  found = {record.get("examples") for _, record in jsonl.read_objects(path)}
  if len(found) == 1:
    value = found.pop()
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
      return value
  numbers = re.findall(r"\d+", pathlib.PurePath(path).stem)
  return int(numbers[-1]) if numbers else None


def system_name(path: str, field: str, default: str | None = None) -> str:
  """The system a file judges: its records' `field` (e.g. b_generator) if they agree, else
  `default`, else the file's name."""
  names = {record.get(field) for _, record in jsonl.read_objects(path)}
  name = names.pop() if len(names) == 1 else None
  return name if isinstance(name, str) and name else default or pathlib.PurePath(path).stem
