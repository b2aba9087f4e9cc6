"""JSON Lines input, local or gs://: one object a line, a bad line an InputError naming file:line."""

import json
from typing import Iterator

from lima_jax import errors
from lima_jax import paths


def objects(path: str, what: str = "a JSON object") -> Iterator[tuple[int, dict]]:
  """(1-based line number, object) of every non-blank line; `what` names a line in errors."""
  try:
    text = paths.path(path).read_text(encoding="utf-8")
  except OSError as e:
    raise errors.InputError(f"{path}: cannot read ({e.strerror or e})") from None
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.InputError(f"{path}:{number}: invalid JSON ({e.msg}); expected {what}") from None
    if not isinstance(record, dict):
      raise errors.InputError(f"{path}:{number}: expected {what}, got {type(record).__name__}")
    yield number, record
