"""The judging loop: one record a prompt, asked in parallel, saved as it goes, resumed without asking twice.

Every record carries a key: a digest of the judge model, the prompt version and the texts judged
(the conversation and the answers). A rerun reads OUTPUT and OUTPUT.partial and asks only the
prompts whose key it does not find there, so an interrupted run resumes, a finished one asks
nothing, and a prompt whose answers changed is judged again. After each finished prompt
OUTPUT.partial is rewritten whole and atomically; OUTPUT appears once every prompt is judged,
and the partial file is removed. Files written by another judge model or prompt version stop the
run rather than mix two judges in one file.

A reply the kind's parser cannot read is asked again up to `parse_retries` times, then recorded
as unparsed (`"unparsed": true`, its texts kept), which `lima-compare` counts apart.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import threading
from typing import Callable, Sequence

from lima_jax import errors
from lima_jax import jsonl
from lima_jax import paths
from lima_jax.judge import client as client_lib
from lima_jax.judge import prompts
from lima_jax.judge import verdicts

PARTIAL_SUFFIX = ".partial"
PARSERS = {prompts.PAIRWISE: verdicts.parse_pairwise, prompts.ABSOLUTE: verdicts.parse_absolute,
           prompts.LIKERT: verdicts.parse_likert}


@dataclasses.dataclass
class Tally:
  """What a run did, for its summary line."""
  prompts: int = 0
  reused: int = 0
  unparsed_prompts: int = 0
  unparsed_replies: int = 0
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def unparsed_reply(self) -> None:
    with self.lock:
      self.unparsed_replies += 1


@dataclasses.dataclass(frozen=True)
class Task:
  """One prompt to judge: its id, its key and the call that asks the judge and makes its record."""
  id: str
  key: str
  ask: Callable[[], dict]


def _digest(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:24]


def _summed(usages: Sequence[dict]) -> dict:
  return {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


class Asker:
  """Asks one question until the reply parses, or `parse_retries` more times."""

  def __init__(self, judge: client_lib.JudgeClient, kind: str, parse_retries: int, tally: Tally):
    self.judge, self.kind, self.parse_retries, self.tally = judge, kind, parse_retries, tally

  def __call__(self, messages: list[dict]) -> dict:
    texts, usages, verdict = [], [], None
    for _ in range(self.parse_retries + 1):
      reply = self.judge.complete(messages)
      texts.append(reply.text)
      usages.append(reply.usage)
      verdict = PARSERS[self.kind](reply.text)
      if verdict is not None:
        break
      self.tally.unparsed_reply()
    return {"verdict": verdict, "raw": texts, "attempts": len(texts), "usage": _summed(usages)}

  def key(self, *judged) -> str:
    """The resume key of a prompt: this judge, this question's version, the texts judged."""
    return _digest(self.kind, self.judge.model, prompts.VERSIONS[self.kind], *judged)

  def header(self, pid: str, key: str) -> dict:
    """The fields every record starts with: which prompt, judged by whom, with which question."""
    return {"id": pid, "judge_model": self.judge.model, "prompt_version": prompts.VERSIONS[self.kind],
            "kind": self.kind, "key": key}


def pairwise_tasks(pairs, ask: Asker) -> list[Task]:
  """Each pair asked in both orders; FastChat's rule makes the winner, both verdicts kept."""
  tasks = []
  for a, b in pairs:
    key = ask.key(a.conversation, a.response, b.response)

    def judge_pair(a=a, b=b, key=key):
      orders = []
      for first_shown, first, second in ((verdicts.A, a, b), (verdicts.B, b, a)):
        asked = ask(prompts.messages(prompts.PAIRWISE, a.conversation, first.response, second.response))
        shown = asked.pop("verdict")
        orders.append({"shown_first": first_shown, "shown_verdict": shown,
                       "verdict": verdicts.unswap(shown, first_shown) if shown else None, **asked})
      unparsed = any(o["verdict"] is None for o in orders)
      winner = None if unparsed else verdicts.combine_orders(orders[0]["verdict"], orders[1]["verdict"])
      return {**ask.header(a.id, key), "winner": winner, "unparsed": unparsed,
              "a_generator": a.generator, "b_generator": b.generator, "orders": orders,
              "usage": _summed([o["usage"] for o in orders])}

    tasks.append(Task(a.id, key, judge_pair))
  return tasks


def absolute_tasks(answers: dict, ask: Asker) -> list[Task]:
  tasks = []
  for answer in answers.values():
    key = ask.key(answer.conversation, answer.response)

    def label(answer=answer, key=key):
      asked = ask(prompts.messages(prompts.ABSOLUTE, answer.conversation, answer.response))
      verdict = asked.pop("verdict")
      return {**ask.header(answer.id, key), "label": verdict,
              "unparsed": verdict is None, "generator": answer.generator, **asked}

    tasks.append(Task(answer.id, key, label))
  return tasks


def likert_tasks(answers: dict[str, list], ask: Asker) -> list[Task]:
  """Every sample scored; the prompt's score is the mean of its parsed samples."""
  tasks = []
  for pid, samples in answers.items():
    key = ask.key(samples[0].conversation, [(s.sample, s.response) for s in samples])

    def score(pid=pid, samples=samples, key=key):
      scored = []
      for s in samples:
        asked = ask(prompts.messages(prompts.LIKERT, s.conversation, s.response))
        scored.append({"sample": s.sample, "score": asked.pop("verdict"), **asked})
      parsed = [s["score"] for s in scored if s["score"] is not None]
      return {**ask.header(pid, key),
              "score": sum(parsed) / len(parsed) if parsed else None, "unparsed": not parsed,
              "unparsed_samples": len(scored) - len(parsed), "generator": samples[0].generator,
              "samples": scored, "usage": _summed([s["usage"] for s in scored])}

    tasks.append(Task(pid, key, score))
  return tasks


class JudgementLog:
  """Finished records by id: earlier runs' (OUTPUT, OUTPUT.partial) and this run's."""

  def __init__(self, output: str, kind: str, judge_model: str):
    self.output, self.partial = output, output + PARTIAL_SUFFIX
    if not paths.is_remote(output):  # Object stores have no directories to make.
      paths.path(output).parent.mkdir(parents=True, exist_ok=True)
    self.earlier: dict[str, dict] = {}
    self.done: dict[str, dict] = {}
    for path in (self.output, self.partial):
      if paths.path(path).exists():
        for number, record in jsonl.read_objects(path):
          self._check(record, f"{path}:{number}", kind, judge_model)
          self.earlier[str(record.get("id"))] = record

  @staticmethod
  def _check(record: dict, where: str, kind: str, judge_model: str) -> None:
    expected = {"kind": kind, "judge_model": judge_model, "prompt_version": prompts.VERSIONS[kind]}
    for field, value in expected.items():
      if record.get(field) != value:
        raise errors.InputError(
            f"{where}: judged with {field}={json.dumps(record.get(field))}, this run has {field}="
            f"{json.dumps(value)}; choose another --output (or delete this file) rather than mix judges")

  def reusable(self, task: Task) -> dict | None:
    record = self.earlier.get(task.id)
    return record if record is not None and record.get("key") == task.key else None

  def add(self, record: dict) -> None:
    self.done[str(record["id"])] = record

  def save(self) -> None:
    """OUTPUT.partial rewritten whole, not appended: gs:// objects cannot grow, and a crash leaves
    the previous version."""
    paths.write_text_atomic(self.partial, jsonl.dumps(self.done.values()))

  def finish(self, order: Sequence[str]) -> list[dict]:
    records = [self.done[pid] for pid in order]
    paths.write_text_atomic(self.output, jsonl.dumps(records))
    partial = paths.path(self.partial)
    if partial.exists():
      partial.unlink()
    return records


def _save_finished(futures, log: JudgementLog) -> None:
  finished = [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]
  for record in finished:
    log.add(record)
  if finished:
    log.save()


def judge_all(tasks: Sequence[Task], log: JudgementLog, tally: Tally, parallel: int,
              progress: Callable[[str], None]) -> list[dict]:
  """Reuses what earlier runs judged, asks the rest `parallel` at a time, writes OUTPUT."""
  todo = []
  for task in tasks:
    record = log.reusable(task)
    if record is None:
      todo.append(task)
    else:
      log.add(record)
  tally.prompts, tally.reused = len(tasks), len(tasks) - len(todo)
  if tally.reused:
    progress(f"resuming: {tally.reused} of {len(tasks)} prompts already judged in {log.output} or {log.partial}")
  step = max(1, len(todo) // 10)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  futures = [pool.submit(task.ask) for task in todo]
  try:
    for finished, future in enumerate(concurrent.futures.as_completed(futures), 1):
      log.add(future.result())
      log.save()
      if finished % step == 0 or finished == len(todo):
        progress(f"judged {finished}/{len(todo)}")
  except BaseException:
    pool.shutdown(wait=True, cancel_futures=True)
    _save_finished(futures, log)  # What the other threads finished is paid for: keep it.
    raise
  pool.shutdown()
  records = log.finish([task.id for task in tasks])
  tally.unparsed_prompts = sum(bool(r.get("unparsed")) for r in records)
  return records
