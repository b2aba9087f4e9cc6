"""LIMA's record format: one conversation a JSONL line, validated, with where it came from.

`{"conversations": [user, assistant, user, ...], "source": ...}`. A bad line raises `DataError`
naming file, line and field; with `skip_bad_lines` it is skipped and recorded in `DataStats`
instead, so nothing disappears unreported. The JSONL reader (`lima_jax.data`) and the TFDS
builder (`lima_jax.lima_tfds`) both validate through `parse_record`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from lima_jax import errors
from lima_jax import metrics
from lima_jax import paths as paths_lib

# Kinds of file, which decide what a valid line is.
TRAIN = "train"  # Conversations with replies to learn from: [user, assistant, ...], even length.
PROMPTS = "prompts"  # Generation inputs: one or more turns ending on a user turn.
SPLIT_KINDS = {"train": TRAIN, "dev": TRAIN, "test": PROMPTS}

USER, ASSISTANT = "user", "assistant"
# Role names accepted in {"role": ..., "content": ...} / {"from": ..., "value": ...} turns.
_ROLES = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT,
          "model": ASSISTANT, "bot": ASSISTANT}
_LIMA_LINE = '{"conversations": [user, assistant, ...], "source": "..."}'
MAX_LISTED = 20  # Bad lines / skipped conversations named one by one in a summary.


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One validated line: turns alternate user, assistant, user, ... (user first)."""

  turns: tuple[str, ...]
  source: str = ""
  path: str = ""
  line: int = 0
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"

  @property
  def prompt_turns(self) -> tuple[str, ...]:
    """The turns up to the last user turn: what a model is asked to continue."""
    return self.turns[:-1] if len(self.turns) % 2 == 0 else self.turns


class DataError(errors.InputError):
  """Bad input data; the message starts with `path:line:` (or `path:` for whole-file problems)."""

  def __init__(self, path: str, line: int, message: str):
    self.path, self.line, self.reason = path, line, message
    super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclasses.dataclass(frozen=True)
class BadLine:
  path: str
  line: int
  reason: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"


@dataclasses.dataclass
class DataStats:
  """What reading and tokenizing did, so that no conversation is dropped without a count.

  Attributes:
    conversations: valid conversations read.
    bad_lines: lines skipped under `skip_bad_lines` (empty otherwise: a bad line raises).
    truncated: conversations longer than `max_len`, cut to it.
    skipped: "path:line" of conversations left with nothing to learn after truncation.
    examples: conversations kept for training / evaluation.
    tokens: tokens of the kept conversations, after truncation.
    loss_tokens: of which the loss is taken on.
  """

  conversations: int = 0
  bad_lines: list[BadLine] = dataclasses.field(default_factory=list)
  truncated: int = 0
  skipped: list[str] = dataclasses.field(default_factory=list)
  examples: int = 0
  tokens: int = 0
  loss_tokens: int = 0

  def to_dict(self) -> dict[str, Any]:
    return {"conversations": self.conversations, "bad_lines": len(self.bad_lines),
            "bad_line_locations": [f"{b.path}:{b.line}" for b in self.bad_lines],
            "truncated": self.truncated, "skipped": len(self.skipped),
            "skipped_locations": list(self.skipped), "examples": self.examples,
            "tokens": self.tokens, "loss_tokens": self.loss_tokens}

  def summary(self) -> str:
    text = (f"{self.conversations} conversations read, {len(self.bad_lines)} bad lines skipped, "
            f"{self.truncated} truncated, {len(self.skipped)} skipped with nothing to learn "
            f"after truncation; {self.examples} kept: {self.tokens} tokens, "
            f"{self.loss_tokens} in the loss")
    for title, items in (("bad lines", [str(b) for b in self.bad_lines]),
                         ("skipped", self.skipped)):
      if items:
        more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
        text += f"\n  {title}: " + "; ".join(items[:MAX_LISTED]) + more
    return text


def _parse_turn(turn: Any, i: int) -> str:
  """A turn's text; role-tagged turns must sit where their role belongs (user at even i)."""
  field = f"conversations[{i}]"
  if isinstance(turn, dict):
    role = turn.get("role", turn.get("from"))
    text = turn.get("content", turn.get("value"))
    if role not in _ROLES:
      raise ValueError(f"{field}: role {role!r} is not one of {sorted(_ROLES)} (LIMA "
                       f"conversations are user and assistant turns only)")
    expected = USER if i % 2 == 0 else ASSISTANT
    if _ROLES[role] != expected:
      start = "does not start with a user turn" if i == 0 else "does not alternate"
      raise ValueError(f"{field}: role {role!r} where a {expected} turn belongs; the conversation "
                       f"{start} (turns go user, assistant, user, ...)")
    turn = text
  if not isinstance(turn, str):
    raise ValueError(f"{field}: a turn must be a string (or a {{\"role\", \"content\"}} object), "
                     f"got {type(turn).__name__}")
  if not turn.strip():
    raise ValueError(f"{field}: the turn is empty")
  return turn


def parse_record(record: Any, kind: str = TRAIN) -> tuple[tuple[str, ...], str, dict[str, Any]]:
  """Validates one decoded line; returns (turns, source, extra fields).

  Raises ValueError whose message names the offending field; readers prefix `path:line`.
  Unknown fields are returned in `extra` and otherwise ignored; `source` is optional.
  """
  if kind not in (TRAIN, PROMPTS):
    raise ValueError(f"unknown kind {kind!r}; expected {TRAIN!r} or {PROMPTS!r}")
  if not isinstance(record, dict):
    raise ValueError(f"a line must be a JSON object like {_LIMA_LINE}, got "
                     f"{type(record).__name__}")
  extra = dict(record)
  if "conversations" in extra:
    raw = extra.pop("conversations")
    if not isinstance(raw, list):
      raise ValueError(f"conversations: must be a list of turns, got {type(raw).__name__}")
    if not raw:
      raise ValueError("conversations: the list is empty")
  elif kind == PROMPTS and "prompt" in extra:
    raw = [extra.pop("prompt")]
  else:
    also = ' (or {"prompt": "..."})' if kind == PROMPTS else ""
    raise ValueError(f"conversations: missing; expected {_LIMA_LINE}{also}")
  turns = tuple(_parse_turn(turn, i) for i, turn in enumerate(raw))
  source = extra.pop("source", None)
  if source is not None and not isinstance(source, str):
    raise ValueError(f"source: must be a string, got {type(source).__name__}")
  if kind == TRAIN:
    if len(turns) < 2:
      raise ValueError("conversations: no assistant turn; a training conversation is "
                       "[user, assistant, ...] (prompt-only files belong in data.test_path)")
    if len(turns) % 2:
      raise ValueError(f"conversations: ends on a user turn (conversations[{len(turns) - 1}]); "
                       f"a training conversation must end with an assistant reply")
  elif len(turns) % 2 == 0:
    raise ValueError(f"conversations: ends on an assistant turn (conversations[{len(turns) - 1}])"
                     f"; a prompt must end on a user turn")
  return turns, source or "", extra


def read_jsonl(path: str | os.PathLike[str], *, kind: str = TRAIN, skip_bad_lines: bool = False,
               stats: DataStats | None = None) -> list[Conversation]:
  """Reads and validates one JSONL file (local or gs://); blank lines are allowed and ignored.

  Raises:
    FileNotFoundError: no such file.
    DataError: the first bad line (unless `skip_bad_lines`), or a file without any record.
  """
  file = paths_lib.path(path)
  path = os.fspath(file)
  if not file.is_file():
    raise FileNotFoundError(f"{path}: data file not found")
  stats = stats if stats is not None else DataStats()
  conversations, bad = [], []
  # One read, then lines: a gs:// object is fetched whole rather than line by line.
  for line_number, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
    if not raw.strip():
      continue
    try:
      try:
        record = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
      except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
      turns, source, extra = parse_record(record, kind)
    except ValueError as e:
      if not skip_bad_lines:
        raise DataError(path, line_number, str(e)) from None
      bad.append(BadLine(path, line_number, str(e)))
      metrics.warn("skipping bad line %s", bad[-1])
      continue
    conversations.append(Conversation(turns, source, path, line_number, extra))
  if not conversations:
    reason = (f"every line is bad ({len(bad)} skipped)" if bad
              else "the file has no records (it is empty or holds only blank lines)")
    raise DataError(path, 0, reason)
  stats.conversations += len(conversations)
  stats.bad_lines.extend(bad)
  return conversations


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Comma-separated files or glob patterns (or a list of them; local or gs://) -> files, globs
  sorted."""
  patterns = paths.split(",") if isinstance(paths, str) else list(paths)
  patterns = [p.strip() for p in patterns if p.strip()]
  if not patterns:
    raise ValueError("no data path given")
  files = []
  for pattern in patterns:
    matches = paths_lib.expand_globs(pattern)
    if not matches:
      raise FileNotFoundError(f"{pattern}: the pattern matches no file")
    files.extend(os.fspath(m) for m in matches)
  return files


def read_conversations(paths: str | Sequence[str], *, kind: str = TRAIN,
                       skip_bad_lines: bool = False,
                       stats: DataStats | None = None) -> list[Conversation]:
  """`read_jsonl` over every file of `expand_paths(paths)`, in order."""
  stats = stats if stats is not None else DataStats()
  return [c for path in expand_paths(paths)
          for c in read_jsonl(path, kind=kind, skip_bad_lines=skip_bad_lines, stats=stats)]
