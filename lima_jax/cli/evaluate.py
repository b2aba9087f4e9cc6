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

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from lima_jax import chat_template as chat_template_lib
from lima_jax import errors
from lima_jax import inference
from lima_jax import paths
from lima_jax import records as records_lib
from lima_jax import sampling
from lima_jax import selection
from lima_jax import sharding
from lima_jax.cli import common
from lima_jax.judge import client as client_lib
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


def _record(p: Prompt, response: str, base: dict, prompt_tokens: int, response_tokens: int,
            finish_reason: str, prompt_truncated: bool) -> dict:
  return {"id": p.id, **({"question_id": p.question_id, "turn": p.turn} if p.turn else {}),
          **({"sample": p.sample} if p.sample is not None else {}),
          "conversation": list(p.turns), "response": response, **base, "prompt_tokens": prompt_tokens,
          "response_tokens": response_tokens, "finish_reason": finish_reason,
          "prompt_truncated": prompt_truncated, **p.meta}


def _progress(total: int, log: Callable[[str], None]) -> Callable[[int], None]:
  start, finished = time.time(), [0]

  def advance(n: int) -> None:
    finished[0] += n
    log(f"answered {finished[0]}/{total} ({time.time() - start:.0f}s)")
  return advance


def answer(loaded, prompts: Sequence[Prompt], responses: ResponseLog, scfg: sampling.SamplingConfig,
           base: dict, log: Callable[[str], None], engine: engine_lib.Engine | None = None,
           prompt_ids: Callable[[Sequence[str]], list[int]] | None = None) -> None:
  """Generates every prompt not yet in `responses`, recording answers as they finish: through
  the engine's slots (refilled as answers end), or in static batches (`engine` None: several
  processes). `prompt_ids` lays a conversation out (default: the model's LIMA layout)."""
  todo_mask = _broadcast_done([not responses.done(_record_key(p)) for p in prompts])
  todo = [p for p, t in zip(prompts, todo_mask) if t]
  if not todo:
    return
  ids = [(prompt_ids or loaded.prompt_ids)(p.turns) for p in todo]
  advance = _progress(len(todo), log)

  def on_batch(batch):
    responses.add([_record(todo[i], loaded.tokenizer.decode(result.tokens), base, result.prompt_tokens,
                           result.response_tokens, result.finish_reason, result.prompt_truncated)
                   for i, result in batch])
    advance(len(batch))

  seeds = [p.stream for p in todo]
  if engine is None:
    loaded.generate(ids, scfg, prompt_seeds=seeds, on_batch=on_batch)
  else:
    batcher_lib.answer_prompts(engine, ids, scfg, bos_id=loaded.tokenizer.bos_id, prompt_seeds=seeds,
                               on_result=lambda i, result: on_batch([(i, result)]))


def answer_by_endpoint(client: client_lib.ChatCompletionsClient, prompts: Sequence[Prompt],
                       responses: ResponseLog, scfg: sampling.SamplingConfig, base: dict, parallel: int,
                       log: Callable[[str], None]) -> None:
  """Asks the endpoint every prompt not yet in `responses`, `parallel` at a time; each prompt's
  seed is `sampling.seed` + its random stream, as the engine's."""
  todo = [p for p in prompts if not responses.done(_record_key(p))]
  advance = _progress(len(todo), log)

  def ask(p: Prompt) -> dict:
    reply = client.complete(chat_template_lib.messages_from_turns(p.turns), extra={"seed": scfg.seed + p.stream})
    return _record(p, reply.text, base, reply.usage["prompt_tokens"], reply.usage["completion_tokens"],
                   reply.finish_reason or "stop", False)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  futures = [pool.submit(ask, p) for p in todo]
  try:
    for future in concurrent.futures.as_completed(futures):
      responses.add([future.result()])
      advance(1)
  except BaseException:
    pool.shutdown(wait=True, cancel_futures=True)
    # What the other threads finished is paid for: keep it for the rerun.
    responses.add([f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None])
    raise
  pool.shutdown()


def endpoint_settings(scfg: sampling.SamplingConfig) -> dict:
  """LIMA's decoding as OpenAI's API takes it (no repetition penalty there): greedy is temperature 0."""
  return {"temperature": 0.0 if scfg.greedy else scfg.temperature, "top_p": 1.0 if scfg.greedy else scfg.top_p}


def make_engine(loaded, scfg: sampling.SamplingConfig, serve_config: dict) -> engine_lib.Engine | None:
  """The continuous-batching engine for one host; None (static batches) across processes."""
  if jax.process_count() > 1:
    return None
  return engine_lib.Engine(
      loaded.model_config, loaded.params, slots=int(serve_config.get("slots", scfg.batch_size)),
      max_len=scfg.max_len, stop_ids=loaded.stop_ids, pad_id=loaded.tokenizer.pad_id or 0,
      mesh=loaded.mesh, steps_per_call=int(serve_config.get("steps_per_call", 4)), top_logprobs=0,
      min_cache_len=int(serve_config.get("min_cache_len", 128)))


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


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """An OpenAI-compatible API that answers instead of a checkpoint (`--endpoint`)."""
  url: str
  model: str
  api_key: str | None = None
  parallel: int = 4
  timeout_seconds: float = 600.0
  retry: client_lib.RetryPolicy = client_lib.RetryPolicy()


@dataclasses.dataclass
class Answerer:
  """Who answers: a checkpoint on the engine, or an endpoint; `answer(prompts, responses, base, log)`."""
  model: str  # Recorded in every line's `model`.
  default_generator: str
  decoding: dict  # Recorded in every line, and checked on resume.
  stops: str  # For the log line.
  answer: Callable[[Sequence[Prompt], ResponseLog, dict, Callable[[str], None]], None]
  close: Callable[[], None] = lambda: None


def _model_answerer(checkpoint: str, scfg: sampling.SamplingConfig, *, mesh_config, tokenizer, dtype, eot,
                    serve_config: dict, chat_template: str, log: Callable[[str], None]) -> Answerer:
  try:
    mesh = sharding.make_mesh(sharding.decode_mesh_config(mesh_config, jax.devices()[0].platform, jax.device_count()))
  except ValueError as e:
    raise InputError(str(e)) from None
  try:
    loaded = inference.load_model(checkpoint, mesh=mesh, tokenizer_path=tokenizer, eot=eot, dtype=dtype)
  except (FileNotFoundError, ValueError) as e:
    raise InputError(f"--checkpoint {checkpoint}: {e}") from None
  prompt_ids, decoding_extra = None, {}
  if chat_template == chat_template_lib.MODEL:
    if loaded.source != "huggingface":
      raise InputError(f"--chat_template=model: {checkpoint} is a lima_jax checkpoint; the model's own "
                       "template comes with a Hugging Face directory (its tokenizer_config.json)")
    template = chat_template_lib.ChatTemplate(loaded.path)
    extra = {template.eos_id} if template.eos_id is not None else set()
    loaded = dataclasses.replace(loaded, stop_ids=tuple(sorted(set(loaded.stop_ids) | extra)),
                                 notes=[n for n in loaded.notes if "(a base model)" not in n])
    loaded.notes.append(f"prompts rendered with {loaded.path}'s own chat template")
    prompt_ids = lambda turns: template.ids(chat_template_lib.messages_from_turns(turns))
    decoding_extra = {"chat_template": chat_template_lib.MODEL}
  for note in loaded.notes:
    log(f"note: {note}")
  if scfg.max_len > loaded.model_config.max_seq_len:
    log(f"note: sampling.max_len {scfg.max_len} > the model's max_seq_len "
        f"{loaded.model_config.max_seq_len}; using the latter")
    scfg = scfg.replace(max_len=loaded.model_config.max_seq_len,
                        max_prompt_len=min(scfg.max_prompt_len, loaded.model_config.max_seq_len - 1))
  engine = make_engine(loaded, scfg, serve_config)
  decoding = {**{k: v for k, v in scfg.to_dict().items() if k != "batch_size"}, **decoding_extra}
  return Answerer(loaded.path, inference.generator_name(loaded.path), decoding,
                  f"stop ids {list(loaded.stop_ids)}",
                  lambda prompts, responses, base, log: answer(loaded, prompts, responses, scfg, base, log,
                                                               engine, prompt_ids))


def _endpoint_answerer(endpoint: Endpoint, scfg: sampling.SamplingConfig) -> Answerer:
  settings = endpoint_settings(scfg)
  client = client_lib.ChatCompletionsClient(
      endpoint.url, endpoint.model, api_key=endpoint.api_key, temperature=settings.pop("temperature"),
      max_tokens=scfg.max_new_tokens, timeout_seconds=endpoint.timeout_seconds, retry=endpoint.retry,
      settings=settings)
  decoding = {"endpoint": client.url, **endpoint_settings(scfg), "max_tokens": scfg.max_new_tokens,
              "seed": scfg.seed}
  return Answerer(endpoint.model, endpoint.model, decoding, f"the endpoint's stops ({client.url})",
                  lambda prompts, responses, base, log: answer_by_endpoint(client, prompts, responses, scfg, base,
                                                                           endpoint.parallel, log),
                  client.close)


def _check_inputs(prompts_path: str, output: str, alpaca_eval: str | None, mt_bench: str | None,
                  samples: int, scfg: sampling.SamplingConfig) -> bool:
  """Checks the paths and flags before anything loads; returns whether the prompts are MT-Bench's."""
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
  if samples < 1:
    raise InputError(f"--samples {samples}: expected at least 1")
  if samples > 1 and (mt or alpaca_eval or scfg.greedy):
    why = "--greedy gives one answer" if scfg.greedy else "MT-Bench and AlpacaEval files hold one answer a prompt"
    raise InputError(f"--samples {samples}: {why}; drop --samples or that flag")
  if paths.path(output).exists() and not paths.path(output + PARTIAL_SUFFIX).exists():
    raise InputError(f"--output {output} already exists (a finished run); choose another --output")
  return mt


def _answer_mt_bench(questions: Sequence[dict], responses: ResponseLog, answerer: Answerer, base: dict,
                     log: Callable[[str], None]) -> list[str]:
  """Turn by turn: turn t is asked with the model's own answers to turns 1..t-1 in the context."""
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
    answerer.answer(round_prompts, responses, base, log)
  return [_mt_key(q["question_id"], t) for q in questions for t in range(1, len(q["turns"]) + 1)]


def evaluate(checkpoint: str | None, prompts_path: str, output: str, *,
             sampling_config: sampling.SamplingConfig, mesh_config: dict | None = None,
             generator: str | None = None, tokenizer: str | None = None, alpaca_eval: str | None = None,
             mt_bench: str | None = None, dtype: str | None = None, eot: str = "<EOT>",
             serve_config: dict | None = None, samples: int = 1, chat_template: str = chat_template_lib.LIMA,
             endpoint: Endpoint | None = None, log: Callable[[str], None] = print) -> list[dict]:
  """The whole command; returns the output records (in prompt order).

  `serve_config` (`config.serve`) sizes the engine: its `slots` (default: sampling.batch_size)
  and `steps_per_call`. `endpoint` answers through an OpenAI-compatible API instead of
  `checkpoint`. `samples` > 1 answers each prompt that many times (lines with `sample` 0..N-1,
  each from its own random stream).
  """
  mt = _check_inputs(prompts_path, output, alpaca_eval, mt_bench, samples, sampling_config)
  questions = read_mt_bench(prompts_path) if mt else None
  prompts = None if mt else with_samples(read_prompts(prompts_path), samples)
  if endpoint is not None:
    answerer = _endpoint_answerer(endpoint, sampling_config)
  else:
    answerer = _model_answerer(checkpoint, sampling_config, mesh_config=mesh_config, tokenizer=tokenizer,
                               dtype=dtype, eot=eot, serve_config=serve_config or {},
                               chat_template=chat_template, log=log)
  generator = generator or answerer.default_generator
  base = {"generator": generator, "decoding": answerer.decoding, "model": answerer.model}
  writer = jax.process_index() == 0
  settings = {"generator": generator, "decoding": answerer.decoding, **({"samples": samples} if samples > 1 else {})}
  if samples > 1:
    base["samples"] = samples
  responses = ResponseLog(output, settings, writer, log)
  log(f"{len(questions) if mt else len(prompts)} {'questions' if mt else 'prompts'} from {prompts_path}; "
      f"generator {generator!r}; {answerer.stops}")
  try:
    if mt:
      order = _answer_mt_bench(questions, responses, answerer, base, log)
    else:
      answerer.answer(prompts, responses, base, log)
      order = [_record_key(p) for p in prompts]
  finally:
    answerer.close()
  records = responses.finish(order)
  if writer:
    if alpaca_eval:
      paths.write_text_atomic(alpaca_eval, json.dumps(alpaca_eval_records(records, generator),
                                                      indent=2, ensure_ascii=False) + "\n")
      log(f"wrote {alpaca_eval}")
    if mt_bench:
      paths.write_text_atomic(mt_bench, _jsonl(mt_bench_records(questions, records, generator)))
      log(f"wrote {mt_bench}")
    log(f"wrote {output} ({len(records)} responses)")
  return records


def _endpoint_from_flags(f) -> Endpoint | None:
  if not f.endpoint:
    if f.endpoint_model:
      raise InputError("--endpoint_model needs --endpoint URL")
    return None
  if not f.endpoint_model:
    raise InputError("--endpoint needs --endpoint_model (the model's name at that endpoint)")
  if f.checkpoint:
    raise InputError("give --checkpoint or --endpoint, not both")
  key = os.environ.get(f.endpoint_api_key_env)
  if not key and f["endpoint_api_key_env"].present:
    raise InputError(f"--endpoint_api_key_env={f.endpoint_api_key_env}: the environment variable is not set")
  return Endpoint(f.endpoint, f.endpoint_model, key, f.parallel, f.endpoint_timeout,
                  client_lib.RetryPolicy(max_retries=f.max_retries, backoff_seconds=f.backoff_seconds))


def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  try:
    scfg = decoding_flags.sampling_config_from_flags(f)
  except ValueError as e:
    raise InputError(f"--config: {e}") from None
  endpoint = _endpoint_from_flags(f)
  if endpoint is None and not f.checkpoint:
    raise InputError("--checkpoint (or --endpoint URL --endpoint_model M) is required")
  checkpoint = None if endpoint else selection.resolve(f.checkpoint, log=print)
  evaluate(checkpoint, f.prompts, f.output, sampling_config=scfg, mesh_config=dict(config.mesh),
           generator=f.generator, tokenizer=f.tokenizer, alpaca_eval=f.alpaca_eval, mt_bench=f.mt_bench,
           dtype=f.dtype, eot=f.eot, serve_config=dict(config.get("serve", {})), samples=f.samples,
           chat_template=f.chat_template, endpoint=endpoint)


def define_flags() -> None:

  decoding_flags.define_decoding_flags(DEFAULT_CONFIG)
  flags.DEFINE_string("prompts", None, "JSONL prompts (LIMA schema, {\"prompt\"} lines, or MT-Bench questions)")
  flags.DEFINE_string("output", None, "JSONL responses, written when every prompt is answered")
  flags.DEFINE_string("generator", None, "name of this system in the outputs (default: the checkpoint's name)")
  flags.DEFINE_string("alpaca_eval", None, "also write AlpacaEval model outputs (JSON) here")
  flags.DEFINE_string("mt_bench", None, "also write MT-Bench answers (JSONL) here; --prompts must be "
                      "an MT-Bench question file")
  flags.DEFINE_string("eot", "<EOT>", "EOT text, for Hugging Face tokenizers")
  flags.DEFINE_integer("samples", 1, "sampled answers a prompt (lines with the same id and `sample` 0..N-1)",
                       lower_bound=1)
  flags.DEFINE_enum("chat_template", chat_template_lib.LIMA, chat_template_lib.CHOICES,
                    "prompt layout: LIMA's, or an instruct model's own chat template (its tokenizer_config.json)")
  flags.DEFINE_string("endpoint", None, "instead of --checkpoint: an OpenAI-compatible API's base URL (.../v1)")
  flags.DEFINE_string("endpoint_model", None, "the model's name at --endpoint")
  flags.DEFINE_string("endpoint_api_key_env", "OPENAI_API_KEY", "environment variable holding --endpoint's key")
  flags.DEFINE_integer("parallel", 4, "--endpoint: requests in flight at once", lower_bound=1)
  flags.DEFINE_float("endpoint_timeout", 600.0, "--endpoint: seconds a request may take before it is retried",
                     lower_bound=0.001)
  flags.DEFINE_integer("max_retries", 6, "--endpoint: retries of a request after 429 / 5xx / timeouts",
                       lower_bound=0)
  flags.DEFINE_float("backoff_seconds", 1.0, "--endpoint: first wait before a retry (doubled each time) "
                     "without Retry-After", lower_bound=0.0)
  flags.mark_flags_as_required(["prompts", "output"])


def run() -> None:
  common.run(main, define_flags, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
