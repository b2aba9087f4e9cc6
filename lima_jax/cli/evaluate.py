r"""Answers held-out prompts with LIMA's decoding and writes files people compare and judge.

  python tools/evaluate.py --checkpoint WORKDIR_OR_CKPT_OR_HF_DIR --prompts test.jsonl \
      --output responses.jsonl [--greedy] [--max_new_tokens N] [--seed S] [--generator NAME] \
      [--config=configs/lima.py:7b --config.sampling.top_p=0.95 --config.mesh.tensor=4 ...] \
      [--alpaca_eval alpaca.json] [--mt_bench answers.jsonl] [--tokenizer PATH] [--dtype bfloat16]

Prompts, one JSON object a line: LIMA's schema, `{"conversations": [user, assistant, ..., user]}`
(a conversation ending on a user turn; earlier turns are context), or `{"prompt": "..."}`. A
prompt's id is its `id` field, else its line number (1-based). An MT-Bench question file
(`{"question_id", "category", "turns": [q1, q2]}`) is answered turn by turn: turn 2 is asked
with the model's own turn-1 answer in the context.

Decoding is LIMA's (nucleus 0.9, temperature 0.7, repetition penalty 1.2 on generated tokens,
2048 tokens of context, stop at EOT or EOS); see lima_jax/sampling.py. Only the `sampling` and
`mesh` sections of `--config` are used (the model comes from the checkpoint); the default
`configs/lima.py:7b` holds LIMA's settings. `--greedy`, `--max_new_tokens` and `--seed` are
shorthands for `--config.sampling.*`.

Output JSONL, one line per prompt (per turn for MT-Bench) in the prompts' order: id,
conversation, response, generator, decoding, model, prompt_tokens, response_tokens,
finish_reason (stop | length | max_len), prompt_truncated. After each finished answer,
OUTPUT.partial is rewritten whole and atomically (object stores cannot append); OUTPUT appears
only once every prompt is answered. Atomic means: locally a temporary file, fsync'ed and renamed;
on gs:// one object upload, which replaces the object only once complete. A rerun with the same
settings resumes from OUTPUT.partial (a torn last line, e.g. from an older appending version, is
dropped and its prompt answered again); with other settings it stops rather than mix them. Every
path (--checkpoint, --prompts, --output, --alpaca_eval, --mt_bench, --tokenizer) may be gs://.

`--alpaca_eval FILE` also writes AlpacaEval's model-outputs JSON (a list of `instruction`,
`output`, `generator`, `dataset`); `--mt_bench FILE` writes FastChat's MT-Bench answer JSONL
(`question_id`, `answer_id`, `model_id`, `choices: [{"index": 0, "turns": [...]}]`, `tstamp`).

Exit status: 0 done; 2 bad input (a message names the file, line or flag); 1 other errors.
"""

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from lima_jax import errors
from lima_jax import inference
from lima_jax import paths
from lima_jax import records as records_lib
from lima_jax import sampling
from lima_jax import sharding
from lima_jax.cli import common
from lima_jax.serve import batcher as batcher_lib
from lima_jax.serve import engine as engine_lib
from lima_jax.cli import decoding as decoding_flags

PARTIAL_SUFFIX = ".partial"
SAMPLE_STREAM_STRIDE = 1 << 24  # Sample k of a prompt draws from stream (prompt's stream + k * this).
DEFAULT_CONFIG = "7b"

InputError = errors.InputError  # Bad input the user must fix; exit status 2.


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: Any  # As given (the `id` field) or the line number.
  turns: tuple[str, ...]
  index: int  # Position in the prompts file: the prompt's random stream.
  meta: dict  # source / dataset / category, carried to the outputs.
  question_id: Any = None  # MT-Bench only.
  turn: int = 0  # MT-Bench only: 1-based turn number.
  sample: int | None = None  # --samples N > 1: which of the prompt's N sampled answers.

  @property
  def stream(self) -> int:
    """The prompt's random stream: its place in the file, MT-Bench turn and sample, so a resumed
    run gives the answers an uninterrupted one would have, and each sample draws its own."""
    return self.index * 16 + self.turn + (self.sample or 0) * SAMPLE_STREAM_STRIDE


# -- Reading prompts ----------------------------------------------------------------------------


def _lines(path: str) -> list[str]:
  """The lines of a text file, local or gs:// (read whole: a gs:// object is one request)."""
  return paths.path(path).read_text(encoding="utf-8").split("\n")


def _first_record(path: str) -> dict | None:
  for line in _lines(path):
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        return None
      return record if isinstance(record, dict) else None
  return None


def is_mt_bench_file(path: str) -> bool:
  record = _first_record(path)
  return bool(record) and "question_id" in record and "turns" in record


def read_prompts(path: str) -> list[Prompt]:
  """LIMA-schema or {"prompt"} lines, validated by lima_jax.data (errors name file and line)."""
  try:
    conversations = records_lib.read_jsonl(path, kind=records_lib.PROMPTS)
  except (records_lib.DataError, FileNotFoundError) as e:
    raise InputError(str(e)) from None
  prompts, seen = [], {}
  for index, c in enumerate(conversations):
    pid = c.extra.get("id", c.line)
    if str(pid) in seen:
      raise InputError(f"{path}:{c.line}: duplicate id {pid!r} (first on line {seen[str(pid)]})")
    seen[str(pid)] = c.line
    meta = {k: c.extra[k] for k in ("dataset", "category") if k in c.extra}
    if c.source:
      meta["source"] = c.source
    prompts.append(Prompt(pid, c.turns, index, meta))
  return prompts


def read_mt_bench(path: str) -> list[dict]:
  """MT-Bench questions: {"question_id", "category", "turns": [str, ...]}."""
  questions, seen = [], {}
  for number, line in enumerate(_lines(path), 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or "question_id" not in record:
      raise InputError(f"{where}: an MT-Bench question needs question_id and turns")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
      raise InputError(f"{where}: turns must be a non-empty list of non-empty strings")
    qid = record["question_id"]
    if str(qid) in seen:
      raise InputError(f"{where}: duplicate question_id {qid!r} (first on line {seen[str(qid)]})")
    seen[str(qid)] = number
    questions.append(dict(record, _index=len(questions)))
  if not questions:
    raise InputError(f"{path}: no questions")
  return questions


# -- The partial file: rewritten atomically per batch, resumed from -------------------------------


def _jsonl(records: Sequence[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_partial(path: str) -> tuple[list[dict], bool]:
  """Records of a partial file, and whether a torn last line was dropped.

  Only the last line may be torn (a crash in the middle of an append, by versions that appended);
  a bad line elsewhere means the file is not ours, and is an error.
  """
  lines = _lines(path)
  torn = False
  if lines and lines[-1] == "":
    lines.pop()
  elif lines:
    lines.pop()  # No newline at the end: the append did not finish.
    torn = True
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or "id" not in record:
        raise ValueError("not a response record")
    except ValueError as e:
      if number == len(lines):
        torn = True
        continue
      raise InputError(f"{path}:{number}: not a response record ({e}); delete the file to start over") from None
    records.append(record)
  return records, torn


def _record_key(record_or_prompt) -> str:
  """A response's identity: its prompt's id, and its sample when a prompt has several."""
  if isinstance(record_or_prompt, dict):
    pid, sample = record_or_prompt["id"], record_or_prompt.get("sample")
  else:
    pid, sample = record_or_prompt.id, record_or_prompt.sample
  return str(pid) if sample is None else f"{pid}#sample{sample}"


def with_samples(prompts: Sequence[Prompt], samples: int) -> list[Prompt]:
  """Each prompt `samples` times (sample 0..N-1, next to each other); as given when N is 1."""
  if samples == 1:
    return list(prompts)
  return [dataclasses.replace(p, sample=k) for p in prompts for k in range(samples)]


class ResponseLog:
  """Finished responses, saved to OUTPUT.partial (rewritten whole) as they come; resumes from it."""

  def __init__(self, output: str, settings: dict, writer: bool, log: Callable[[str], None]):
    self.output = output
    self.partial = output + PARTIAL_SUFFIX
    self.settings = settings
    self.writer = writer
    self.records: dict[str, dict] = {}
    if paths.path(self.partial).exists():
      records, torn = read_partial(self.partial)
      for number, r in enumerate(records, 1):
        self._check_settings(r, number)
        self.records[_record_key(r)] = r
      if torn:
        log(f"{self.partial}: dropped a torn last line; that prompt is answered again")
      if writer and torn:
        paths.write_text_atomic(self.partial, _jsonl(records))
      log(f"resuming: {len(self.records)} responses already in {self.partial}")

  def _check_settings(self, record: dict, number: int) -> None:
    for key, value in self.settings.items():
      if record.get(key) != value:
        raise InputError(
            f"{self.partial}:{number}: written with {key}={json.dumps(record.get(key))}, this run has "
            f"{key}={json.dumps(value)}; rerun with the same settings, or delete {self.partial} "
            f"(or choose another --output) to start over")

  def done(self, key: str) -> bool:
    return key in self.records

  def add(self, records: Sequence[dict]) -> None:
    for r in records:
      self.records[_record_key(r)] = r
    if not self.writer or not records:
      return
    # Whole, not appended: gs:// objects cannot grow, and a crash leaves the previous version.
    paths.write_text_atomic(self.partial, _jsonl(list(self.records.values())))

  def finish(self, order: Sequence[str]) -> list[dict]:
    """Writes OUTPUT in `order` (the writer holds every record) and removes the partial file."""
    if not self.writer:
      return [self.records[k] for k in order if k in self.records]
    ordered = [self.records[k] for k in order]
    paths.write_text_atomic(self.output, _jsonl(ordered))
    partial = paths.path(self.partial)
    if partial.exists():
      partial.unlink()
    return ordered


# -- Answering ----------------------------------------------------------------------------------


def _broadcast_done(mask: list[bool]) -> list[bool]:
  """Process 0's view of what is done, so every process runs the same batches."""
  if jax.process_count() == 1:
    return mask
  return [bool(x) for x in multihost_utils.broadcast_one_to_all(np.asarray(mask, np.bool_))]


def answer(loaded, prompts: Sequence[Prompt], responses: ResponseLog, scfg: sampling.SamplingConfig,
           base: dict, log: Callable[[str], None], engine: engine_lib.Engine | None = None) -> None:
  """Generates every prompt not yet in `responses`, recording answers as they finish: through
  the engine's slots (refilled as answers end), or in static batches (`engine` None: several
  processes)."""
  todo_mask = _broadcast_done([not responses.done(_record_key(p)) for p in prompts])
  todo = [p for p, t in zip(prompts, todo_mask) if t]
  if not todo:
    return
  ids = [loaded.prompt_ids(p.turns) for p in todo]
  total, start = len(todo), time.time()
  finished = [0]

  def on_batch(batch):
    records = []
    for i, result in batch:
      p = todo[i]
      record = {"id": p.id, **({"question_id": p.question_id, "turn": p.turn} if p.turn else {}),
                **({"sample": p.sample} if p.sample is not None else {}),
                "conversation": list(p.turns), "response": loaded.tokenizer.decode(result.tokens),
                **base, "prompt_tokens": result.prompt_tokens, "response_tokens": result.response_tokens,
                "finish_reason": result.finish_reason, "prompt_truncated": result.prompt_truncated,
                **p.meta}
      records.append(record)
    responses.add(records)
    finished[0] += len(batch)
    log(f"answered {finished[0]}/{total} ({time.time() - start:.0f}s)")

  seeds = [p.stream for p in todo]
  if engine is None:
    loaded.generate(ids, scfg, prompt_seeds=seeds, on_batch=on_batch)
  else:
    batcher_lib.answer_prompts(engine, ids, scfg, bos_id=loaded.tokenizer.bos_id, prompt_seeds=seeds,
                               on_result=lambda i, result: on_batch([(i, result)]))


def make_engine(loaded, scfg: sampling.SamplingConfig, serve_config: dict) -> engine_lib.Engine | None:
  """The continuous-batching engine for one host; None (static batches) across processes."""
  if jax.process_count() > 1:
    return None
  return engine_lib.Engine(
      loaded.model_config, loaded.params, slots=int(serve_config.get("slots", scfg.batch_size)),
      max_len=scfg.max_len, stop_ids=loaded.stop_ids, pad_id=loaded.tokenizer.pad_id or 0,
      mesh=loaded.mesh, steps_per_call=int(serve_config.get("steps_per_call", 4)), top_logprobs=0)


def alpaca_eval_records(records: Sequence[dict], generator: str) -> list[dict]:
  """AlpacaEval model outputs: single-turn instructions (earlier turns joined by blank lines)."""
  return [{"instruction": "\n\n".join(r["conversation"]), "output": r["response"], "generator": generator,
           "dataset": r.get("dataset", r.get("source", "lima"))} for r in records]


def mt_bench_records(questions: Sequence[dict], records: Sequence[dict], generator: str) -> list[dict]:
  by_key = {_record_key(r): r for r in records}
  out = []
  for q in questions:
    turns = [by_key[_mt_key(q["question_id"], t)]["response"] for t in range(1, len(q["turns"]) + 1)]
    digest = hashlib.sha256(f"{generator}/{q['question_id']}".encode()).hexdigest()[:22]
    out.append({"question_id": q["question_id"], "answer_id": digest, "model_id": generator,
                "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()})
  return out


def _mt_key(question_id, turn: int) -> str:
  return f"{question_id}:turn{turn}"


def evaluate(checkpoint: str, prompts_path: str, output: str, *, sampling_config: sampling.SamplingConfig,
             mesh_config: dict | None = None, generator: str | None = None, tokenizer: str | None = None,
             alpaca_eval: str | None = None, mt_bench: str | None = None, dtype: str | None = None,
             eot: str = "<EOT>", serve_config: dict | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
  """The whole command; returns the output records (in prompt order).

  `serve_config` (`config.serve`) sizes the engine: its `slots` (default: sampling.batch_size)
  and `steps_per_call`.
  """

  for flag, path in (("--output", output), ("--alpaca_eval", alpaca_eval), ("--mt_bench", mt_bench)):
    # Object stores have no directories to create first; a local one must exist.
    if path and not paths.is_remote(path) and not paths.absolute(path).parent.is_dir():
      raise InputError(f"{flag} {path}: the directory does not exist")
  if not paths.path(prompts_path).is_file():
    raise InputError(f"--prompts {prompts_path}: no such file")
  mt = is_mt_bench_file(prompts_path)
  if mt_bench and not mt:
    raise InputError(f"--mt_bench needs an MT-Bench question file ({{\"question_id\", \"turns\"}} lines); "
                     f"{prompts_path} is not one")
  questions = read_mt_bench(prompts_path) if mt else None
  prompts = None if mt else read_prompts(prompts_path)
  if paths.path(output).exists() and not paths.path(output + PARTIAL_SUFFIX).exists():
    raise InputError(f"--output {output} already exists (a finished run); choose another --output")

  try:
    mesh = sharding.make_mesh(mesh_config or {"fsdp": -1})
  except ValueError as e:
    raise InputError(str(e)) from None
  try:
    loaded = inference.load_model(checkpoint, mesh=mesh, tokenizer_path=tokenizer, eot=eot, dtype=dtype)
  except (FileNotFoundError, ValueError) as e:
    raise InputError(f"--checkpoint {checkpoint}: {e}") from None
  for note in loaded.notes:
    log(f"note: {note}")
  scfg = sampling_config
  if scfg.max_len > loaded.model_config.max_seq_len:
    log(f"note: sampling.max_len {scfg.max_len} > the model's max_seq_len "
        f"{loaded.model_config.max_seq_len}; using the latter")
    scfg = scfg.replace(max_len=loaded.model_config.max_seq_len,
                        max_prompt_len=min(scfg.max_prompt_len, loaded.model_config.max_seq_len - 1))
  generator = generator or inference.generator_name(loaded.path)
  decoding = {k: v for k, v in scfg.to_dict().items() if k != "batch_size"}
  base = {"generator": generator, "decoding": decoding, "model": loaded.path}
  writer = jax.process_index() == 0
  engine = make_engine(loaded, scfg, serve_config or {})
  responses = ResponseLog(output, {"generator": generator, "decoding": decoding}, writer, log)
  log(f"{len(questions) if mt else len(prompts)} {'questions' if mt else 'prompts'} from {prompts_path}; "
      f"generator {generator!r}; stop ids {list(loaded.stop_ids)}")

  if mt:
    for turn in range(1, max(len(q["turns"]) for q in questions) + 1):
      round_prompts = []
      for q in questions:
        if len(q["turns"]) < turn:
          continue
        context = []
        for t in range(1, turn):
          context += [q["turns"][t - 1], responses.records[_mt_key(q["question_id"], t)]["response"]]
        meta = {k: q[k] for k in ("category",) if k in q}
        round_prompts.append(Prompt(_mt_key(q["question_id"], turn), tuple(context + [q["turns"][turn - 1]]),
                                    q["_index"], meta, q["question_id"], turn))
      answer(loaded, round_prompts, responses, scfg, base, log, engine)
    order = [_mt_key(q["question_id"], t) for q in questions for t in range(1, len(q["turns"]) + 1)]
  else:
    answer(loaded, prompts, responses, scfg, base, log, engine)
    order = [_record_key(p) for p in prompts]

  records = responses.finish(order)
  if writer:
    if alpaca_eval:
      paths.write_text_atomic(alpaca_eval, json.dumps(alpaca_eval_records(records, generator),
                                                      indent=2, ensure_ascii=False) + "\n")
      log(f"wrote {alpaca_eval}")
    if mt_bench:
      lines = mt_bench_records(questions, records, generator)
      paths.write_text_atomic(mt_bench, _jsonl(lines))
      log(f"wrote {mt_bench}")
    log(f"wrote {output} ({len(records)} responses)")
  return records


def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  try:
    scfg = decoding_flags.sampling_config_from_flags(f)
  except ValueError as e:
    raise InputError(f"--config: {e}") from None
  evaluate(f.checkpoint, f.prompts, f.output, sampling_config=scfg, mesh_config=dict(config.mesh),
           generator=f.generator, tokenizer=f.tokenizer, alpaca_eval=f.alpaca_eval, mt_bench=f.mt_bench,
           dtype=f.dtype, eot=f.eot, serve_config=dict(config.get("serve", {})))


def define_flags() -> None:

  decoding_flags.define_decoding_flags(DEFAULT_CONFIG)
  flags.DEFINE_string("prompts", None, "JSONL prompts (LIMA schema, {\"prompt\"} lines, or MT-Bench questions)")
  flags.DEFINE_string("output", None, "JSONL responses, written when every prompt is answered")
  flags.DEFINE_string("generator", None, "name of this system in the outputs (default: the checkpoint's name)")
  flags.DEFINE_string("alpaca_eval", None, "also write AlpacaEval model outputs (JSON) here")
  flags.DEFINE_string("mt_bench", None, "also write MT-Bench answers (JSONL) here; --prompts must be "
                      "an MT-Bench question file")
  flags.DEFINE_string("eot", "<EOT>", "EOT text, for Hugging Face tokenizers")
  flags.mark_flags_as_required(["checkpoint", "prompts", "output"])


def run() -> None:
  common.run(main, define_flags, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
