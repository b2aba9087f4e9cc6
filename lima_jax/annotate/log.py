"""The output file: one line a choice (annotator, item), rewritten whole and atomically on each one.

Whole, not appended: a changed answer replaces its line, gs:// objects cannot be appended to,
and a crash leaves the previous complete file (`paths.write_text_atomic`). The lines are what
`lima-compare pairwise` and `lima-compare agreement` read: `winner` is mapped back to the
systems of the --a / --b files, whatever side each was shown on.
"""

import dataclasses
import datetime
import json

from lima_jax import errors
from lima_jax import jsonl
from lima_jax import paths

CHOICES = ("left", "right", "neither")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One annotator's answer on one item, as the page sent it."""
  annotator: str
  item_id: str
  choice: str  # "left" | "right" | "neither": the side clicked, as shown.
  shown: tuple[str, str]  # Systems shown (left, right): ("a", "b") or ("b", "a").
  seconds: float  # From the item appearing to the click.


def winner(choice: str, shown: tuple[str, str]) -> str:
  """The system chosen ("a", "b" or "tie"), from the side clicked and what each side showed."""
  if choice == "neither":
    return "tie"
  return shown[0] if choice == "left" else shown[1]


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class AnnotationLog:
  """Every choice so far, keyed by (annotator, item id), in the order first made."""

  def __init__(self, output: str, study_digest: str, seed: int, known_ids):
    self.output = output
    self.settings = {"study": study_digest, "seed": seed}
    self.records: dict[tuple[str, str], dict] = {}
    self._labellers: dict[str, set[str]] = {}  # item id -> annotators who labelled it.
    if paths.path(output).exists():
      self._read(set(known_ids))

  def _read(self, known_ids: set[str]) -> None:
    for number, record in jsonl.read_objects(self.output, "an annotation line (id, annotator, winner)"):
      where = f"{self.output}:{number}"
      if not {"id", "annotator", "winner"} <= set(record):
        raise errors.InputError(f"{where}: not an annotation line (id, annotator, winner)")
      for key, value in self.settings.items():
        if record.get(key) != value:
          raise errors.InputError(
              f"{where}: written with {key}={json.dumps(record.get(key))}, this run has {json.dumps(value)} "
              f"(other --a/--b files or --seed); choose another --output or rerun with the same ones")
      if record["winner"] not in ("a", "b", "tie"):
        raise errors.InputError(f"{where}: winner {record['winner']!r} is not one of a, b, tie")
      if str(record["id"]) not in known_ids:
        raise errors.InputError(f"{where}: id {record['id']!r} is not in the answer files")
      key = (str(record["annotator"]), str(record["id"]))
      if key in self.records:
        raise errors.InputError(f"{where}: annotator {key[0]!r} labels id {key[1]!r} twice")
      self.records[key] = record
      self._labellers.setdefault(key[1], set()).add(key[0])

  def get(self, annotator: str, item_id: str) -> dict | None:
    return self.records.get((annotator, item_id))

  def done(self, annotator: str) -> list[str]:
    """Item ids the annotator has labelled, oldest first."""
    return [item_id for (name, item_id) in self.records if name == annotator]

  def labellers(self, item_id: str) -> set[str]:
    return self._labellers.get(item_id, set())

  def annotators(self) -> set[str]:
    return {name for name, _ in self.records}

  def add(self, choice: Choice) -> dict:
    """Records `choice` (replacing the annotator's earlier one on that item) and rewrites the file."""
    key = (choice.annotator, choice.item_id)
    previous = self.records.get(key)
    record = {"id": choice.item_id, "winner": winner(choice.choice, choice.shown),
              "annotator": choice.annotator, "choice": choice.choice, "shown": list(choice.shown),
              "seconds": round(float(choice.seconds), 3), "time": _now(),
              "revision": previous["revision"] + 1 if previous else 1, **self.settings}
    records = {**self.records, key: record}  # A replaced key keeps its place (first insertion).
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values())
    paths.write_text_atomic(self.output, text)  # First: a failed write changes nothing here either.
    self.records = records
    self._labellers.setdefault(choice.item_id, set()).add(choice.annotator)
    return record
