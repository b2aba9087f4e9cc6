"""The decoding engine behind `lima-serve` and `lima-evaluate`: continuous batching over a fixed
number of slots (no HTTP here; `lima_jax.serve.batcher` drives it, the server and evaluation use that).

Three programs, in the manner of MaxText's maxengine:

* `prefill(prompt)`: one prompt at a power-of-two bucketed width into a small cache of its own
  (its "prefix"); one compile per bucket.
* `insert(prefix, slot, settings)`: copies the prefix into one slot of the single KV cache of all
  slots and sets that slot's decoding values. The cache and the per-slot values ("the state")
  stay on the device and are donated to every program that changes them.
* `generate()`: `steps_per_call` decode steps over all slots in one program (one host round trip
  per call, not per token); a free or finished slot is stepped too, its outputs masked.

The cache is as long as the longest live answer needs, not always `max_len`: its length moves
between powers of two (from `min_cache_len`) as answers grow and end (`resize`, a copy between
calls), so a decode step reads the keys and values of the positions in use, not of the whole
context; each length has its programs, all compiled by `warm_up`.

Every request setting is data, not program: each slot holds its temperature, top_p, repetition
penalty, greedy flag, random key, token budget and stop ids as arrays, so after `warm_up` no
request of any prompt length or settings compiles anything.

The arithmetic is `lima_jax.sampling`'s, row by row: the prompt but its last token is prefilled,
the first step feeds the last prompt token, and a slot samples its i-th token with key
fold_in(fold_in(key(seed), stream), i). So a request's answer does not depend on the other slots
or on when it joined: greedy answers equal `sampling.generate`'s, and a seeded sampled answer is
the same alone and under load.
"""

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax import attention
from lima_jax import model as model_lib
from lima_jax import sampling
from lima_jax.serve import programs as programs_lib

MAX_STOP_IDS = programs_lib.MAX_STOP_IDS


@dataclasses.dataclass(frozen=True)
class SlotSettings:
  """One request's decoding, as a slot holds it (defaults: LIMA's, `sampling.SamplingConfig`)."""
  max_tokens: int
  temperature: float = 0.7
  top_p: float = 0.9
  repetition_penalty: float = 1.2
  greedy: bool = False
  seed: int = 0
  stream: int = 0  # With `seed`, picks the random stream (evaluation: the prompt's index).
  penalize_prompt: bool = False  # penalty_scope "all": the prompt's tokens count as seen.
  logprobs: bool = False  # Whether the outputs carry log-probabilities (else zeros).
  stop_ids: tuple[int, ...] | None = None  # None: the engine's (the model's) stop ids.

  @classmethod
  def from_sampling(cls, config: sampling.SamplingConfig, max_tokens: int, stream: int = 0,
                    **changes) -> "SlotSettings":
    return cls(max_tokens=max_tokens, temperature=config.temperature, top_p=config.top_p,
               repetition_penalty=config.repetition_penalty, greedy=config.greedy, seed=config.seed,
               stream=stream, penalize_prompt=config.penalty_scope == "all").replace(**changes)

  def replace(self, **changes) -> "SlotSettings":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class StepOutputs:
  """What one `generate` call produced, host arrays [slots, steps] (top_* [slots, steps, k]).

  `emitted`: the slot was decoding, so `tokens` holds a real sample; `stopped`: that sample is a
  stop id (not part of the answer); `finished`: the slot's answer ended with that sample (stop id or
  budget), and the slot is free from the next call on. Log-probabilities are the model's own
  (before penalty, temperature and nucleus), as OpenAI's and vLLM's APIs report them.
  """
  tokens: np.ndarray
  emitted: np.ndarray
  stopped: np.ndarray
  finished: np.ndarray
  logprobs: np.ndarray
  top_ids: np.ndarray
  top_logprobs: np.ndarray


def cache_lengths(max_len: int, shortest: int) -> list[int]:
  """The cache lengths an engine moves between: powers of two from `shortest` below `max_len`,
  and `max_len`."""
  lengths, n = [], 1
  while n < max_len:
    if n >= shortest:
      lengths.append(n)
    n *= 2
  return lengths + [max_len]


def _prefix_width(prefix) -> int:
  """The positions a prefill's prefix holds."""
  return attention.cache_batch_and_length(prefix["cache"])[1]


def _int32(value: int) -> np.int32:
  """Any Python int as an int32 seed (wrapped), so an API's 64-bit seed is a valid key input."""
  return np.array(int(value) % (1 << 32), np.uint32).view(np.int32)


class Engine:
  """The slots, their one KV cache, and the compiled programs over them.

  `max_len` is each slot's context (prompt + answer); `min_cache_len` the shortest cache kept.
  On a mesh the parameters and the cache take the training shardings (`model.param_shardings`, the cache's logical axes), the per-slot
  values the batch axis; one host is the scope. `compiler_weight_layouts` (default: on a TPU
  mesh) stores the weights in the layouts the decode program wants (`Programs.pin_weight_formats`).
  """

  def __init__(self, model_config: model_lib.ModelConfig, params, *, slots: int, max_len: int,
               stop_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
               steps_per_call: int = 4, top_logprobs: int = 20, compiler_weight_layouts: bool | None = None,
               min_cache_len: int = 128):
    if slots < 1 or steps_per_call < 1 or max_len < 2:
      raise ValueError(f"engine: slots={slots}, steps_per_call={steps_per_call}, max_len={max_len}; "
                       f"expected slots >= 1, steps_per_call >= 1, max_len >= 2")
    if len(stop_ids) > MAX_STOP_IDS:
      raise ValueError(f"engine: {len(stop_ids)} stop ids; at most {MAX_STOP_IDS}")
    self.model_config = model_config
    self.slots, self.max_len, self.mesh = slots, max_len, mesh
    self.stop_ids, self.pad_id = tuple(int(s) for s in stop_ids), int(pad_id)
    self.steps_per_call = steps_per_call
    self.top_logprobs = min(top_logprobs, model_config.vocab_size)
    self.params = sampling.place_params(params, model_config, mesh)
    self.programs = programs_lib.Programs(
        model_config, slots=slots, max_len=max_len, mesh=mesh, pad_id=self.pad_id,
        steps_per_call=steps_per_call, top_logprobs=self.top_logprobs,
        per_layer=sampling.per_layer_copies(self.params))
    if compiler_weight_layouts is None:  # On a TPU mesh: a decode step reads each weight once.
      compiler_weight_layouts = mesh is not None and mesh.devices.flat[0].platform == "tpu"
    if compiler_weight_layouts and mesh is not None and not self.programs.per_layer:
      self.params = self.programs.pin_weight_formats(self.params)
    self._programs = self.programs.fns
    self.copies = self._programs["copies"](self.params) if self.programs.per_layer else None
    self.cache_lengths = cache_lengths(max_len, min_cache_len)
    self._reset()

  # -- Public programs -------------------------------------------------------------------------

  @property
  def cache_len(self) -> int:
    """The positions the cache holds now (one of `cache_lengths`)."""
    return self._cache_len

  def buckets(self) -> list[int]:
    """The prompt widths prefill compiles for (powers of two from 16 up to `max_len`)."""
    widths, n = [], 1
    while not widths or widths[-1] < self.max_len:
      widths.append(sampling.bucket(n, self.max_len))
      n = widths[-1] + 1
    return widths

  def prefill(self, prompt: Sequence[int]):
    """The prompt's keys and values (a device "prefix" for `insert`)."""
    n = len(prompt)
    if not 1 <= n < self.max_len:
      raise ValueError(f"prompt of {n} tokens; expected 1 to {self.max_len - 1} (the context is {self.max_len})")
    width = sampling.bucket(n, self.max_len)
    tokens = np.full((1, width), self.pad_id, np.int32)
    tokens[0, :n] = prompt
    return self._programs["prefill"](self.params, self.copies, self._put(tokens), self._put(np.int32(n)))

  def insert(self, prefix, slot: int, prompt: Sequence[int], settings: SlotSettings) -> None:
    """Starts `prompt`'s answer in `slot` (free, or its answer is dropped) from its prefix."""
    row = self._slot_row(prompt, settings)
    self._fit_cache(max(_prefix_width(prefix), len(prompt) - 1 + self.steps_per_call))
    self._write_slot(prefix, slot, row)

  def _slot_row(self, prompt: Sequence[int], settings: SlotSettings) -> dict:
    """What `insert` writes into a slot: the request's first token, position and settings."""
    n = len(prompt)
    budget = min(settings.max_tokens, self.max_len - n)
    if budget < 1:
      raise ValueError(f"no room to answer: prompt of {n} tokens in a context of {self.max_len}")
    stops = self.stop_ids if settings.stop_ids is None else tuple(settings.stop_ids)
    if len(stops) > MAX_STOP_IDS:
      raise ValueError(f"{len(stops)} stop ids; at most {MAX_STOP_IDS}")
    row = dict(
        token=np.int32(prompt[-1]), position=np.int32(n - 1), budget=np.int32(budget),
        seed=np.array([_int32(settings.seed), _int32(settings.stream)], np.int32),
        temperature=np.float32(settings.temperature if not settings.greedy else 1.0),
        nucleus_cut=sampling.nucleus_cut(settings.top_p), penalty=np.float32(settings.repetition_penalty),
        greedy=np.bool_(settings.greedy), logprobs=np.bool_(settings.logprobs),
        penalize_prompt=np.bool_(settings.penalize_prompt),
        stop=np.array(list(stops) + [-1] * (MAX_STOP_IDS - len(stops)), np.int32))
    return row

  def _write_slot(self, prefix, slot: int, row: dict) -> None:
    self.state = self._programs["insert"](self.state, prefix, self._put(np.int32(slot)),
                                          {k: self._put(v) for k, v in row.items()})
    self._position[slot], self._live[slot] = int(row["position"]), True

  def release(self, slot: int) -> None:
    """Stops the answer in `slot` (a stop string seen, a client gone); free from the next call."""
    self.state = self._programs["release"](self.state, self._put(np.int32(slot)))
    self._live[slot] = False

  def generate(self) -> StepOutputs:
    """`steps_per_call` decode steps over every slot; the outputs in one transfer to the host."""
    if self._live.any():
      self._fit_cache()
    self.state, outputs = self._programs["generate"](self.params, self.copies, self.state)
    host = {k: np.asarray(v) for k, v in jax.device_get(outputs).items()}
    out = StepOutputs(**{k: np.swapaxes(v, 0, 1) for k, v in host.items()})
    self._position = np.minimum(self._position + out.emitted.sum(axis=1), self.max_len - 1)
    self._live &= ~out.finished.any(axis=1)
    return out

  def score(self, prompt: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each prompt token's log-probability given the ones before it, and the top-k at each place:
    ([n - 1], [n - 1, k] ids, [n - 1, k] log-probabilities) for tokens 1..n-1 (what `echo` returns)."""
    n = len(prompt)
    if not 1 <= n <= self.max_len:
      raise ValueError(f"prompt of {n} tokens; expected 1 to {self.max_len}")
    width = sampling.bucket(n, self.max_len)
    tokens = np.full((1, width), self.pad_id, np.int32)
    tokens[0, :n] = prompt
    chosen, ids, lps = jax.device_get(self._programs["score"](self.params, self._put(tokens)))
    return np.asarray(chosen)[:n - 1], np.asarray(ids)[:n - 1], np.asarray(lps)[:n - 1]

  def warm_up(self, with_score: bool = False) -> None:
    """Compiles every program at every prompt bucket and cache length (and each move between
    neighbouring lengths), so that serving compiles nothing."""
    for width in self.buckets():
      prompt = [self.pad_id] * min(width, self.max_len - 1)
      prefix = self.prefill(prompt)
      for length in self.cache_lengths:
        if length >= width:  # Each length that can hold the prefix.
          self._reset(length)
          self._write_slot(prefix, 0, self._slot_row(prompt, SlotSettings(max_tokens=1)))
      if with_score:
        self.score([self.pad_id] * width)
    for length in self.cache_lengths:
      self._reset(length)
      self.generate()
      self.release(0)
    for shorter, longer in zip(self.cache_lengths, self.cache_lengths[1:]):
      self._reset(shorter)
      self._fit_cache(longer)
      self._fit_cache(shorter)
    self._reset()

  def _reset(self, length: int | None = None) -> None:
    """Every slot free, the cache `length` long (default: the shortest)."""
    self._cache_len = length or self.cache_lengths[0]
    self.state = self._programs["init"](self._cache_len)
    self._position = np.zeros(self.slots, np.int64)  # Each live slot's next write position.
    self._live = np.zeros(self.slots, bool)

  def _fit_cache(self, need: int = 0) -> None:
    """Moves the cache to the shortest of `cache_lengths` that holds `need` positions and the
    next call's writes of every live slot, one neighbouring length at a time (the moves
    `warm_up` compiles)."""
    need = max(need, int((self._position[self._live] + self.steps_per_call).max(initial=0)))
    target = next((n for n in self.cache_lengths if n >= need), self.cache_lengths[-1])
    while self._cache_len != target:
      i = self.cache_lengths.index(self._cache_len)
      self._cache_len = self.cache_lengths[i + 1 if target > self._cache_len else i - 1]
      self.state = self._programs["resize"](self.state, self._cache_len)

  def _put(self, value):
    """Host values onto the default device, or replicated on the mesh: always the same placement,
    so no call sees new input shardings (which would compile)."""
    where = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
    return jax.device_put(value, where)
