"""The items of a study: one prompt and the two systems' answers, read from `lima-evaluate` files.

Both files must answer the same prompts: the same ids, each once, with the same conversation.
Anything else is an `InputError` naming the file and line, so a study never pairs answers to
different questions.
"""

import dataclasses
import hashlib
import json

from lima_jax import errors
from lima_jax import jsonl

# The paper's question and options (LIMA, appendix C), shown to annotators and to the model judge.
QUESTION = ("Imagine that you have a super-intelligent AI assistant, and that you require help with the "
            "following question. Which answer best satisfies your needs?")
OPTIONS = {"left": "Answer A is significantly better.", "right": "Answer B is significantly better.",
           "neither": "Neither is significantly better."}


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  conversation: tuple[str, ...]  # user, assistant, ..., user: the last turn is what both answer.
  answers: dict  # "a" / "b" -> the system's answer.


@dataclasses.dataclass
class Study:
  items: tuple[Item, ...]
  generators: dict  # "a" / "b" -> the system's name in its file (never shown to annotators).
  digest: str  # Of both files' prompts and answers: an output file belongs to one study.
  by_id: dict = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    self.by_id = {item.id: item for item in self.items}


@dataclasses.dataclass(frozen=True)
class _Answer:
  line: int
  conversation: tuple[str, ...]
  response: str
  generator: str


def _strings(value) -> bool:
  return isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value)


def read_answers(path: str) -> dict[str, _Answer]:
  """id -> answer of one `lima-evaluate` output file, in file order; bad lines -> InputError."""
  answers: dict[str, _Answer] = {}
  for number, record in jsonl.read_objects(path, "an answer (lima-evaluate's output)"):
    where = f"{path}:{number}"
    for field in ("id", "conversation", "response"):
      if field not in record:
        raise errors.InputError(f"{where}: no {field!r} field (expected lima-evaluate's output: "
                                f"id, conversation, response)")
    if not _strings(record["conversation"]):
      raise errors.InputError(f"{where}: conversation must be a non-empty list of strings")
    if not isinstance(record["response"], str):
      raise errors.InputError(f"{where}: response must be a string")
    pid = str(record["id"])
    if pid in answers:
      raise errors.InputError(f"{where}: duplicate id {pid!r} (first on line {answers[pid].line})")
    answers[pid] = _Answer(number, tuple(record["conversation"]), record["response"],
                           str(record.get("generator", "")))
  if not answers:
    raise errors.InputError(f"{path}: no answers")
  return answers


def _check_same_prompts(a_path: str, a: dict, b_path: str, b: dict) -> None:
  for pid, answer in b.items():
    if pid not in a:
      raise errors.InputError(f"{b_path}:{answer.line}: id {pid!r} is not in {a_path}; both files "
                              f"must answer the same prompts")
    if a[pid].conversation != answer.conversation:
      raise errors.InputError(f"{b_path}:{answer.line}: id {pid!r} has another conversation than "
                              f"{a_path}:{a[pid].line}; both files must answer the same prompts")
  for pid, answer in a.items():
    if pid not in b:
      raise errors.InputError(f"{a_path}:{answer.line}: id {pid!r} is not in {b_path}; both files "
                              f"must answer the same prompts")


def load(a_path: str, b_path: str) -> Study:
  """The study of two answer files (items in A's order)."""
  a, b = read_answers(a_path), read_answers(b_path)
  _check_same_prompts(a_path, a, b_path, b)
  items = tuple(Item(pid, answer.conversation, {"a": answer.response, "b": b[pid].response})
                for pid, answer in a.items())
  content = json.dumps([[i.id, i.conversation, i.answers["a"], i.answers["b"]] for i in items])
  digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
  generators = {"a": next(iter(a.values())).generator, "b": next(iter(b.values())).generator}
  return Study(items, generators, digest)
