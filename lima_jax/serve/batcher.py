"""Continuous batching: a queue of requests fed into the engine's slots between decode steps.

Each round: drop the answers cancelled since the last one (a stop string, a client gone), fill
every free slot from the queue (prefill + insert), run one `generate` call, hand each request its
new tokens. A slot freed in one round is refilled in the next, so the slots stay busy while
requests wait. `run_until_idle` drives it from the caller's thread (evaluation); `start` runs it
on a thread of its own (the server).
"""

import collections
import dataclasses
import threading
from typing import Callable, Sequence

from lima_jax import sampling
from lima_jax.serve import engine as engine_lib

FINISH_STOP, FINISH_LENGTH, FINISH_MAX_LEN = "stop", "length", "max_len"


class QueueFull(Exception):
  """The queue holds `max_queue` requests already."""


@dataclasses.dataclass
class TokenLogprobs:
  """The model's log-probability of a sampled token and its top alternatives."""
  logprob: float
  top_ids: list[int]
  top_logprobs: list[float]


class Handle:
  """One request: its answer as it grows, and how it ended (`finish_reason` set once done).

  `tokens` excludes a stop id; `generated` counts every sampled token (a stop id included).
  Read it from `on_update`, or after `wait()`.
  """

  def __init__(self, prompt: list[int], settings: engine_lib.SlotSettings,
               on_update: Callable[["Handle"], None] | None):
    self.prompt, self.settings, self.on_update = prompt, settings, on_update
    self.tokens: list[int] = []
    self.logprobs: list[TokenLogprobs] = []
    self.generated = 0
    self.finish_reason: str | None = None
    self.error: Exception | None = None
    self.cancel_reason: str | None = None  # Set by `cancel`; the batcher ends the answer.
    self._done = threading.Event()

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def cancel(self, reason: str = FINISH_STOP) -> None:
    """Ends the answer at the next round (any thread); `reason` becomes its finish_reason."""
    self.cancel_reason = reason

  def wait(self, timeout: float | None = None) -> bool:
    return self._done.wait(timeout)

  def finish(self, reason: str, error: Exception | None = None) -> None:
    """Marks the answer ended (the batcher's call)."""
    self.finish_reason, self.error = reason, error
    self._done.set()


class Batcher:
  """Feeds requests through one engine. `submit` is thread-safe; one thread runs the rounds."""

  def __init__(self, engine: engine_lib.Engine, max_queue: int = 0):
    self.engine = engine
    self.max_queue = max_queue  # 0: unbounded.
    self._queue: collections.deque[Handle] = collections.deque()
    self._slots: list[Handle | None] = [None] * engine.slots
    self._lock = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.rounds = 0  # `generate` calls so far.
    self.cancelled = 0  # Answers ended by `cancel` (a stop string, a client gone, shutdown).

  # -- Submitting ------------------------------------------------------------------------------

  def submit(self, prompt: Sequence[int], settings: engine_lib.SlotSettings,
             on_update: Callable[[Handle], None] | None = None) -> Handle:
    prompt = [int(t) for t in prompt]
    if not 1 <= len(prompt) < self.engine.max_len:
      raise ValueError(f"a prompt of {len(prompt)} tokens; expected 1 to {self.engine.max_len - 1}")
    handle = Handle(prompt, settings, on_update)
    with self._lock:
      if self._stopping:
        raise QueueFull("the server is shutting down")
      if self.max_queue and len(self._queue) >= self.max_queue:
        raise QueueFull(f"{len(self._queue)} requests are waiting (the queue's limit)")
      self._queue.append(handle)
      self._lock.notify_all()
    return handle

  @property
  def busy(self) -> int:
    """Requests queued or in a slot."""
    with self._lock:
      return len(self._queue) + sum(h is not None for h in self._slots)

  def stats(self) -> dict[str, int]:
    """Counters a monitor reads: slots decoding, requests waiting, rounds run, answers cancelled."""
    with self._lock:
      return {"running": sum(h is not None for h in self._slots), "waiting": len(self._queue),
              "rounds": self.rounds, "cancelled": self.cancelled}

  # -- Rounds ----------------------------------------------------------------------------------

  def step(self) -> bool:
    """One round; returns whether any request is still queued or decoding."""
    self._drop_cancelled()
    self._fill_slots()
    if all(h is None for h in self._slots):
      with self._lock:
        return bool(self._queue)
    outputs = self.engine.generate()
    self.rounds += 1
    self._dispatch(outputs)
    with self._lock:
      return bool(self._queue) or any(h is not None for h in self._slots)

  def run_until_idle(self) -> None:
    while self.step():
      pass

  def start(self) -> None:
    """Runs rounds on a background thread until `shutdown`."""
    self._thread = threading.Thread(target=self._serve, name="lima-engine", daemon=True)
    self._thread.start()

  def shutdown(self, timeout: float) -> bool:
    """Stops taking requests, lets those queued or decoding finish for up to `timeout` seconds,
    then cancels the rest; returns whether everything finished in time."""
    with self._lock:
      self._stopping = True
      self._lock.notify_all()
    finished = True
    if self._thread is not None:
      self._thread.join(timeout)
      finished = not self._thread.is_alive()
    with self._lock:
      left = list(self._queue) + [h for h in self._slots if h is not None]
      self._queue.clear()
    for handle in left:
      handle.cancel("abort")
    return finished

  def _serve(self) -> None:
    while True:
      with self._lock:
        while not self._queue and all(h is None for h in self._slots) and not self._stopping:
          self._lock.wait()
        if self._stopping and not self._queue and all(h is None for h in self._slots):
          return
      try:
        self.step()
      except Exception as e:  # pylint: disable=broad-except
        self._fail_all(e)

  def _fail_all(self, error: Exception) -> None:
    """An engine failure ends every request in flight with the error, and the server goes on."""
    for slot, handle in enumerate(self._slots):
      if handle is not None:
        self._slots[slot] = None
        self._finish(handle, "error", error)

  def _drop_cancelled(self) -> None:
    for slot, handle in enumerate(self._slots):
      if handle is not None and handle.cancel_reason is not None:
        self.engine.release(slot)
        with self._lock:
          self._slots[slot] = None
          self.cancelled += 1
        self._finish(handle, handle.cancel_reason)
    with self._lock:
      cancelled = [h for h in self._queue if h.cancel_reason is not None]
      for h in cancelled:
        self._queue.remove(h)
      self.cancelled += len(cancelled)
    for h in cancelled:
      self._finish(h, h.cancel_reason)

  def _fill_slots(self) -> None:
    for slot in range(self.engine.slots):
      if self._slots[slot] is not None:
        continue
      with self._lock:
        if not self._queue:
          return
        handle = self._queue.popleft()
      try:
        self.engine.insert(self.engine.prefill(handle.prompt), slot, handle.prompt, handle.settings)
      except ValueError as e:
        self._finish(handle, "error", e)
        continue
      self._slots[slot] = handle

  def _dispatch(self, out: engine_lib.StepOutputs) -> None:
    for slot, handle in enumerate(self._slots):
      if handle is None:
        continue
      finished = False
      for t in range(out.tokens.shape[1]):
        if not out.emitted[slot, t]:
          break
        handle.generated += 1
        if not out.stopped[slot, t]:
          handle.tokens.append(int(out.tokens[slot, t]))
          if handle.settings.logprobs:
            handle.logprobs.append(TokenLogprobs(float(out.logprobs[slot, t]),
                                                 out.top_ids[slot, t].tolist(),
                                                 out.top_logprobs[slot, t].tolist()))
        if out.finished[slot, t]:
          self._slots[slot] = None
          self._finish(handle, self._finish_reason(handle, bool(out.stopped[slot, t])))
          finished = True
          break
      if not finished and handle.on_update is not None:
        handle.on_update(handle)

  def _finish_reason(self, handle: Handle, stopped: bool) -> str:
    if stopped:
      return FINISH_STOP
    if handle.generated < handle.settings.max_tokens:
      return FINISH_MAX_LEN
    return FINISH_LENGTH

  def _finish(self, handle: Handle, reason: str, error: Exception | None = None) -> None:
    handle.finish(reason, error)
    if handle.on_update is not None:
      handle.on_update(handle)


def generate_all(engine: engine_lib.Engine, prompts: Sequence[Sequence[int]],
                 settings: Sequence[engine_lib.SlotSettings],
                 on_done: Callable[[int, Handle], None] | None = None) -> list[Handle]:
  """Answers every prompt through the slots (refilled as answers finish), on this thread;
  `on_done(index, handle)` is called as each answer ends."""
  batcher = Batcher(engine)
  def notify(index):
    def update(handle):
      if handle.done and on_done is not None:
        on_done(index, handle)
    return update
  handles = [batcher.submit(p, s, notify(i)) for i, (p, s) in enumerate(zip(prompts, settings))]
  batcher.run_until_idle()
  for h in handles:
    if h.error is not None:
      raise h.error
  return handles


def answer_prompts(engine: engine_lib.Engine, prompts: Sequence[Sequence[int]],
                   sampling_config: sampling.SamplingConfig, *, bos_id: int | None = None,
                   prompt_seeds: Sequence[int] | None = None,
                   on_result: Callable[[int, sampling.GenerationResult], None] | None = None,
                   ) -> list[sampling.GenerationResult]:
  """`sampling.generate`'s contract (truncation, budgets, finish reasons, per-prompt random streams
  `prompt_seeds`), answered through the engine's slots; `on_result(index, result)` as each ends."""
  scfg = sampling_config
  kept = sampling.prepare_prompts(engine.model_config, prompts, scfg, bos_id)
  seeds = list(range(len(prompts))) if prompt_seeds is None else [int(s) for s in prompt_seeds]
  if len(seeds) != len(prompts):
    raise ValueError(f"prompt_seeds has {len(seeds)} entries for {len(prompts)} prompts")
  settings = [engine_lib.SlotSettings.from_sampling(scfg, scfg.max_new_tokens, stream=s) for s in seeds]

  def result(i: int, handle: Handle) -> sampling.GenerationResult:
    return sampling.GenerationResult(
        tokens=handle.tokens, finish_reason=handle.finish_reason, prompt_tokens=len(kept[i]),
        response_tokens=len(handle.tokens), generated_tokens=handle.generated,
        prompt_truncated=len(kept[i]) < len(prompts[i]))

  done = None if on_result is None else (lambda i, h: on_result(i, result(i, h)))
  handles = generate_all(engine, kept, settings, done)
  return [result(i, h) for i, h in enumerate(handles)]
