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

Every request setting is data, not program: each slot holds its temperature, top_p, repetition
penalty, greedy flag, random key, token budget and stop ids as arrays, so after `warm_up` no
request of any prompt length or settings compiles anything.

The arithmetic is `lima_jax.sampling`'s, row by row: the prompt but its last token is prefilled,
the first step feeds the last prompt token, and a slot samples its i-th token with key
fold_in(fold_in(key(seed), stream), i). So a request's answer does not depend on the other slots
or on when it joined: greedy answers equal `sampling.generate`'s, and a seeded sampled answer is
the same alone and under load.
"""

import contextlib
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lima_jax import attention
from lima_jax import model as model_lib
from lima_jax import sampling
from lima_jax import sharding

MAX_STOP_IDS = 8  # Stop ids a slot can hold (the model's EOT/EOS, plus a generation config's).
_SLOT_AXES = {"token": ("batch",), "position": ("batch",), "count": ("batch",), "budget": ("batch",),
              "active": ("batch",), "key": ("batch", None),
              "temperature": ("batch",), "nucleus_cut": ("batch",), "penalty": ("batch",),
              "greedy": ("batch",), "logprobs": ("batch",), "stop": ("batch", None),
              "seen": ("batch", "vocab")}


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


def _int32(value: int) -> np.int32:
  """Any Python int as an int32 seed (wrapped), so an API's 64-bit seed is a valid key input."""
  return np.array(int(value) % (1 << 32), np.uint32).view(np.int32)


class Engine:
  """The slots, their one KV cache, and the compiled programs over them.

  `max_len` is each slot's context (prompt + answer). On a mesh the parameters and the cache take
  the training shardings (`model.param_shardings`, the cache's logical axes), the per-slot
  values the batch axis; one host is the scope.
  """

  def __init__(self, model_config: model_lib.ModelConfig, params, *, slots: int, max_len: int,
               stop_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
               steps_per_call: int = 4, top_logprobs: int = 20):
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
    self.per_layer = sampling.per_layer_copies(self.params)
    self._state_shardings = None if mesh is None else self._shardings(self._abstract_state())
    self._programs = self._compile_fns()
    self.layers = self._programs["unstack"](self.params) if self.per_layer else None
    self.state = self._programs["init"]()

  # -- Public programs -------------------------------------------------------------------------

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
    return self._programs["prefill"](self.params, self.layers, self._put(tokens), self._put(np.int32(n)))

  def insert(self, prefix, slot: int, prompt: Sequence[int], settings: SlotSettings) -> None:
    """Starts `prompt`'s answer in `slot` (free, or its answer is dropped) from its prefix."""
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
    self.state = self._programs["insert"](self.state, prefix, self._put(np.int32(slot)),
                                          {k: self._put(v) for k, v in row.items()})

  def release(self, slot: int) -> None:
    """Stops the answer in `slot` (a stop string seen, a client gone); free from the next call."""
    self.state = self._programs["release"](self.state, self._put(np.int32(slot)))

  def generate(self) -> StepOutputs:
    """`steps_per_call` decode steps over every slot; the outputs in one transfer to the host."""
    self.state, outputs = self._programs["generate"](self.params, self.layers, self.state)
    host = {k: np.asarray(v) for k, v in jax.device_get(outputs).items()}
    return StepOutputs(**{k: np.swapaxes(v, 0, 1) for k, v in host.items()})

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
    """Compiles every program at every bucket, so that serving compiles nothing."""
    for width in self.buckets():
      prompt = [self.pad_id] * min(width, self.max_len - 1)
      self.insert(self.prefill(prompt), 0, prompt, SlotSettings(max_tokens=1))
      if with_score:
        self.score([self.pad_id] * width)
    self.generate()
    self.release(0)
    self.state = self._programs["init"]()

  # -- Building the programs -------------------------------------------------------------------

  def _put(self, value):
    return jax.device_put(value, None if self.mesh is None else NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  def _context(self):
    return sharding.activation_sharding(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _jit(self, fn, *, donate=(), state_out: str | None = None):
    """jax.jit under the mesh's activation rules; `state_out` names where the state is returned
    ("all" or "first" of a pair), so it keeps one sharding from call to call (no recompiles)."""
    def traced(*args):
      with self._context():
        return fn(*args)
    out = None
    if self._state_shardings is not None and state_out is not None:
      out = self._state_shardings if state_out == "all" else (self._state_shardings, None)
    if out is None:
      return jax.jit(traced, donate_argnums=donate)
    return jax.jit(traced, donate_argnums=donate, out_shardings=out)

  def _shardings(self, abstract_state):
    slot_values = {k: v for k, v in abstract_state.items() if k != "cache"}
    out = sharding.tree_shardings({k: _SLOT_AXES[k] for k in slot_values}, slot_values, self.mesh)
    cache, axes = abstract_state["cache"], attention.cache_logical_axes(abstract_state["cache"])
    if isinstance(cache, tuple):  # Per-layer caches: one {"k", "v"} each.
      out["cache"] = tuple(sharding.tree_shardings(a, c, self.mesh) for a, c in zip(axes, cache))
    else:
      out["cache"] = sharding.tree_shardings(axes, cache, self.mesh)
    return out

  def _new_cache(self, batch: int, length: int):
    cache = model_lib.init_cache(self.model_config, batch, length)
    if self.per_layer:
      cache = attention.unstack_cache(cache)
    return attention.constrain_cache(cache)

  def _init_state(self):
    b, vpad = self.slots, self.model_config.padded_vocab_size
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    zeros = lambda dtype, *shape: jnp.zeros((b,) + shape, dtype)
    return dict(
        cache=self._new_cache(b, self.max_len), token=zeros(jnp.int32), position=zeros(jnp.int32),
        count=zeros(jnp.int32), budget=zeros(jnp.int32), active=zeros(bool),
        key=zeros(jnp.uint32, *key_shape), temperature=jnp.ones((b,), jnp.float32),
        nucleus_cut=zeros(jnp.float32), penalty=jnp.ones((b,), jnp.float32), greedy=zeros(bool),
        logprobs=zeros(bool), stop=jnp.full((b, MAX_STOP_IDS), -1, jnp.int32),
        seen=sharding.constrain(zeros(bool, vpad), ("batch", "vocab")))

  def _abstract_state(self):
    with self._context():
      return jax.eval_shape(self._init_state)

  def _compile_fns(self) -> dict[str, Any]:
    return dict(
        init=self._jit(self._init_state, state_out="all"),
        unstack=jax.jit(model_lib.unstack_layers),
        prefill=self._jit(self._prefill_impl),
        insert=self._jit(self._insert_impl, donate=(0,), state_out="all"),
        release=self._jit(lambda state, slot: {**state, "active": state["active"].at[slot].set(False)},
                          donate=(0,), state_out="all"),
        generate=self._jit(self._generate_impl, donate=(2,), state_out="first"),
        score=self._jit(self._score_impl))

  def _prefill_impl(self, params, layers, tokens, length):
    width = tokens.shape[1]
    positions = jnp.arange(width, dtype=jnp.int32)[None]
    _, cache = model_lib.bind(self.model_config, params).decode(
        tokens, positions, self._new_cache(1, width), padded_vocab=True, layers=layers)
    valid = positions < length
    seen = sampling.token_presence(tokens, valid, self.model_config.padded_vocab_size)[0]
    return {"cache": attention.constrain_cache(cache), "seen": seen}

  def _insert_impl(self, state, prefix, slot, row):
    def put(big, small, axes):
      start = tuple(slot if a == "batch" else 0 for a in axes)
      return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)
    axes = attention.cache_logical_axes(state["cache"])
    cache = jax.tree.map(put, state["cache"], prefix["cache"], axes)
    base = jax.random.key(row["seed"][0])
    key = jax.random.key_data(jax.random.fold_in(base, row["seed"][1]))
    seen = prefix["seen"] & row["penalize_prompt"]
    new = dict(state, cache=attention.constrain_cache(cache))
    for name in ("token", "position", "budget", "temperature", "nucleus_cut", "penalty", "greedy",
                 "logprobs", "stop"):
      new[name] = state[name].at[slot].set(row[name])
    new.update(count=state["count"].at[slot].set(0), active=state["active"].at[slot].set(True),
               key=state["key"].at[slot].set(key), seen=state["seen"].at[slot].set(seen))
    return new

  def _generate_impl(self, params, layers, state):
    cfg = self.model_config
    model = model_lib.bind(cfg, params)
    k = self.top_logprobs
    rows = jnp.arange(self.slots)

    def step(s, _):
      logits, cache = model.decode(s["token"][:, None], s["position"][:, None], s["cache"],
                                   padded_vocab=True, layers=layers)
      raw = sampling.mask_padded_vocab(logits[:, 0].astype(jnp.float32), cfg.vocab_size)
      processed = sampling.process_logits_per_row(raw, s["seen"], s["penalty"], s["temperature"],
                                                  s["nucleus_cut"], s["greedy"])
      keys = jax.vmap(lambda d, i: jax.random.fold_in(jax.random.wrap_key_data(d), i))(s["key"], s["count"])
      sampled = jax.vmap(jax.random.categorical)(keys, processed)
      active = s["active"]
      token = jnp.where(s["greedy"], jnp.argmax(processed, axis=-1), sampled).astype(jnp.int32)
      token = jnp.where(active, token, self.pad_id)
      lp, top_ids, top_lps = self._logprobs(raw, token, s["logprobs"] & active, k)
      count = s["count"] + active.astype(jnp.int32)
      stopped = active & jnp.any(token[:, None] == s["stop"], axis=-1)
      finished = active & (stopped | (count >= s["budget"]))
      new = dict(s, cache=attention.constrain_cache(cache), count=count, active=active & ~finished,
                 token=jnp.where(active, token, s["token"]),
                 position=jnp.where(active, jnp.minimum(s["position"] + 1, self.max_len - 1), s["position"]),
                 seen=s["seen"].at[rows, token].max(active))
      out = dict(tokens=token, emitted=active, stopped=stopped, finished=finished, logprobs=lp,
                 top_ids=top_ids, top_logprobs=top_lps)
      return new, out

    return jax.lax.scan(step, state, None, length=self.steps_per_call)

  def _logprobs(self, raw, token, wanted, k):
    """The chosen token's log-probability and the top k, computed only when some slot asks."""
    b = raw.shape[0]
    def compute(raw):
      logp = jax.nn.log_softmax(raw, axis=-1)
      chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
      if not k:
        return chosen, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
      top_lps, top_ids = jax.lax.top_k(logp, k)
      return chosen, top_ids.astype(jnp.int32), top_lps
    def skip(raw):
      return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32))
    return jax.lax.cond(jnp.any(wanted), compute, skip, raw)

  def _score_impl(self, params, tokens):
    logits = model_lib.bind(self.model_config, params)(tokens, padded_vocab=True)[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    following = jnp.roll(tokens[0], -1)
    chosen = jnp.take_along_axis(logp, following[:, None], axis=-1)[:, 0]
    top_lps, top_ids = jax.lax.top_k(logp, max(self.top_logprobs, 1))
    return chosen, top_ids.astype(jnp.int32), top_lps
