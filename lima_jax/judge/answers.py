"""Answer files as `lima-evaluate` writes them, read for judging and checked line by line.

One JSON object a line: `id`, `conversation` (the turns, ending on the user turn answered),
`response`, and optionally `generator` and `sample`. A prompt answered several times (sampled
answers, as the paper's ablations score 5 a prompt) has one line per answer, the same `id` and a
distinct integer `sample` (0, 1, ...); a line without `sample` is sample 0. Several files given
as one comma-separated list are one sample each (N runs of `lima-evaluate` with N seeds). Any problem (invalid
JSON, a missing or empty field, a repeated id and sample, two files that answer different
prompts) is an `InputError` naming the file and line.
"""

import dataclasses

from lima_jax import errors
from lima_jax import jsonl


@dataclasses.dataclass(frozen=True)
class Answer:
  id: str
  conversation: tuple[str, ...]
  response: str
  generator: str
  sample: int
  where: str  # file:line


def _field(record: dict, name: str, where: str):
  if name not in record:
    raise errors.InputError(f"{where}: no {name!r} field (an answer line holds id, conversation, response)")
  return record[name]


def _answer(record: dict, where: str, sample: int | None = None) -> Answer:
  pid = _field(record, "id", where)
  conversation = _field(record, "conversation", where)
  if (not isinstance(conversation, list) or not conversation
      or not all(isinstance(t, str) for t in conversation)):
    raise errors.InputError(f"{where}: 'conversation' must be a non-empty list of strings (the turns)")
  response = _field(record, "response", where)
  if not isinstance(response, str):
    raise errors.InputError(f"{where}: 'response' must be a string, got {type(response).__name__}")
  if sample is not None and "sample" in record:
    raise errors.InputError(f"{where}: a 'sample' field in one of several files; each file of the list "
                            "is one sample, or give one file whose lines carry 'sample'")
  sample = record.get("sample", 0) if sample is None else sample
  if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
    raise errors.InputError(f"{where}: 'sample' must be an integer >= 0, got {sample!r}")
  return Answer(str(pid), tuple(conversation), response, str(record.get("generator", "")), sample, where)


def _records(spec: str):
  """(record, file:line, sample or None) of one answer file, or of several (comma-separated), the
  k-th file's lines being sample k: N runs of lima-evaluate with N seeds are N samples."""
  files = [part for part in spec.split(",") if part]
  for k, path in enumerate(files):
    for number, record in jsonl.read_objects(path):
      yield record, f"{path}:{number}", k if len(files) > 1 else None


def read_answers(spec: str) -> dict[str, list[Answer]]:
  """id -> its answers ordered by sample, ids in file order; `spec` is a file, or several files
  separated by commas (one sample each: they must answer the same prompts)."""
  by_id: dict[str, dict[int, Answer]] = {}
  for record, where, file_sample in _records(spec):
    answer = _answer(record, where, file_sample)
    samples = by_id.setdefault(answer.id, {})
    if answer.sample in samples:
      raise errors.InputError(f"{answer.where}: duplicate id {answer.id!r} sample {answer.sample} "
                              f"(first on {samples[answer.sample].where}); several answers to one "
                              "prompt need distinct 'sample' fields")
    first = next(iter(samples.values()), None)
    if first is not None and first.conversation != answer.conversation:
      raise errors.InputError(f"{answer.where}: id {answer.id!r} has another conversation than on {first.where}")
    samples[answer.sample] = answer
  if not by_id:
    raise errors.InputError(f"{spec}: no answers")
  counts = {len(samples) for samples in by_id.values()}
  if "," in spec and len(counts) > 1:
    short = next(s for s in by_id.values() if len(s) < max(counts))
    first = next(iter(short.values()))
    raise errors.InputError(f"{first.where}: id {first.id!r} is answered in {len(short)} of the files "
                            f"{spec}; each file must answer every prompt")
  return {pid: [samples[s] for s in sorted(samples)] for pid, samples in by_id.items()}


def single_answers(path: str, kind: str) -> dict[str, Answer]:
  """One answer a prompt, for judgements that compare or label one answer (pairwise, absolute)."""
  single = {}
  for pid, answers in read_answers(path).items():
    if len(answers) > 1:
      raise errors.InputError(f"{answers[1].where}: id {pid!r} has {len(answers)} samples; {kind} judges "
                              "one answer a prompt (likert averages several)")
    single[pid] = answers[0]
  return single


def paired_answers(path_a: str, path_b: str) -> list[tuple[Answer, Answer]]:
  """(a, b) for every prompt, in A's order; both files must answer the same prompts."""
  a, b = single_answers(path_a, "pairwise"), single_answers(path_b, "pairwise")
  for pid, answer in a.items():
    if pid not in b:
      raise errors.InputError(f"{answer.where}: id {pid!r} has no answer in {path_b}")
  for pid, answer in b.items():
    if pid not in a:
      raise errors.InputError(f"{answer.where}: id {pid!r} has no answer in {path_a}")
    if a[pid].conversation != answer.conversation:
      raise errors.InputError(f"{answer.where}: id {pid!r} answers another conversation than {a[pid].where}")
  return [(a[pid], b[pid]) for pid in a]
