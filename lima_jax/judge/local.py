"""A judge checkpoint answering in-process on the decoding engine: `lima-judge --judge_checkpoint`.

The same `complete(messages) -> Reply` as the HTTP judge, with no server: the messages become
the judge model's prompt (LIMA's layout, or the model's own chat template), the run loop's
threads submit them to one continuous batcher (so `--parallel` requests share the engine's
slots), and usage counts the prompt's and the reply's tokens. Temperature 0 is greedy; otherwise
each attempt at a question draws from its own seeded stream, so a rerun asks the same way.
"""

import collections
import hashlib
import json
import threading
from typing import Sequence

from lima_jax import chat_template as chat_template_lib
from lima_jax import sampling
from lima_jax.judge import client as client_lib
from lima_jax.serve import batcher as batcher_lib
from lima_jax.serve import engine as engine_lib


class EngineJudge:
  """`loaded` (an `inference.LoadedModel`) judging through `slots` engine slots of `max_len` tokens."""

  def __init__(self, loaded, model: str, *, max_tokens: int, temperature: float, slots: int, max_len: int,
               template: chat_template_lib.ChatTemplate | None = None,
               counter: client_lib.RequestCounter | None = None):
    self.model, self.loaded, self.template = model, loaded, template
    self.max_tokens, self.temperature = max_tokens, temperature
    self.counter = counter or client_lib.RequestCounter()
    stops = set(loaded.stop_ids) | ({template.eos_id} if template and template.eos_id is not None else set())
    max_len = min(max_len, loaded.model_config.max_seq_len)
    self.engine = engine_lib.Engine(loaded.model_config, loaded.params, slots=slots, max_len=max_len,
                                    stop_ids=sorted(stops), pad_id=loaded.tokenizer.pad_id or 0,
                                    mesh=loaded.mesh, top_logprobs=0)
    # Long questions keep their newest tokens (the answers and the final instruction).
    self.prompt_budget = sampling.SamplingConfig(max_len=max_len, max_new_tokens=max_tokens).prompt_budget
    self.batcher = batcher_lib.Batcher(self.engine)
    self.batcher.start()
    self._asked: collections.Counter = collections.Counter()
    self._lock = threading.Lock()

  def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
    if self.template is not None:
      ids = self.template.ids(messages)
    else:
      ids = self.loaded.prompt_ids(chat_template_lib.turns_from_messages(messages))
    return sampling.truncate_prompt(ids, self.prompt_budget, self.loaded.tokenizer.bos_id)

  def _settings(self, messages: Sequence[dict]) -> engine_lib.SlotSettings:
    digest = hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()
    with self._lock:
      attempt = self._asked[digest]
      self._asked[digest] += 1
    return engine_lib.SlotSettings(max_tokens=self.max_tokens, temperature=self.temperature or 1.0, top_p=1.0,
                                   repetition_penalty=1.0, greedy=self.temperature == 0,
                                   seed=int(digest[:8], 16), stream=attempt)

  def complete(self, messages: Sequence[dict]) -> client_lib.Reply:
    ids = self.prompt_ids(messages)
    self.counter.attempt(retry=False)
    handle = self.batcher.submit(ids, self._settings(messages))
    handle.wait()
    if handle.error is not None:
      raise client_lib.JudgeUnavailable(f"judge {self.model}: the engine failed: {handle.error}")
    usage = {"prompt_tokens": len(ids), "completion_tokens": handle.generated,
             "total_tokens": len(ids) + handle.generated}
    self.counter.tokens(usage)
    return client_lib.Reply(self.loaded.tokenizer.decode(handle.tokens), usage)

  def close(self) -> None:
    self.batcher.shutdown(timeout=60.0)
