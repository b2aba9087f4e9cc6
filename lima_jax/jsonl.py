"""JSON-lines files of objects (answers, judgements, prompts), read with the file:line of every record.

A bad line is bad input: the `errors.InputError` names the file and line, so commands that read
these files stop with one line (exit status 2) instead of a traceback.
"""

import json
from typing import Iterator

from lima_jax import errors
from lima_jax import paths


def read_objects(path: str) -> Iterator[tuple[int, dict]]:
  """(1-based line number, object) for each non-blank line of a JSONL file, local or gs://."""
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
      raise errors.InputError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise errors.InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    yield number, record


def dumps(records) -> str:
  """Records as JSONL text, one object a line, non-ASCII kept as is."""
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
