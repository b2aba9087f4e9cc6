"""The engine's compiled programs (`lima_jax.serve.engine` drives them): init, resize, prefill,
insert, release, generate and score, as pure functions of the parameters and the slots' state.

The state's cache may be shorter than `max_len` (the engine keeps it as long as the longest live
answer needs, `resize` moves it between lengths): every program but `init` and `resize` takes
its length from the state it is given, so jax compiles each once per cache length.

Built from shapes alone (no parameters, no devices touched), so the same programs serve a running
engine and ahead-of-time compilation for a TPU slice (`lower_generate`).
"""

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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



class Programs:
  """The jitted programs for one model, slot count, context and mesh (`fns`, by name)."""

  def __init__(self, model_config: model_lib.ModelConfig, *, slots: int, max_len: int, mesh: Mesh | None,
               pad_id: int, steps_per_call: int, top_logprobs: int, per_layer: bool):
    self.model_config, self.slots, self.max_len, self.mesh = model_config, slots, max_len, mesh
    self.pad_id, self.steps_per_call, self.top_logprobs = pad_id, steps_per_call, top_logprobs
    self.per_layer = per_layer  # CPU copies of the weights and caches (sampling.per_layer_copies).
    self.state_shardings = None if mesh is None else self._shardings(self.abstract_state())
    self.weight_formats = None  # The weights' device layouts, once `pin_weight_formats` chose them.
    self.fns = self._compile_fns()

  def abstract_state(self):
    with self._context():
      return jax.eval_shape(lambda: self._init_state(self.max_len))

  def lower_generate(self, abstract_params):
    """`generate` lowered for ShapeDtypeStructs with shardings, the weights' layouts left to the
    compiler (as `pin_weight_formats` serves them): ahead-of-time compiles."""
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         self.abstract_state(), self.state_shardings)
    auto = jax.tree.map(lambda p: Format(Layout.AUTO, p.sharding), abstract_params)
    plain = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), abstract_params)
    return self._jit(self._generate_impl, donate=(2,), state_out="first",
                     in_shardings=(auto, None, self.state_shardings)).lower(plain, None, state)

  def pin_weight_formats(self, params):
    """Lets the compiler choose the weights' layouts for `generate` (the TPU's default layout of the
    q/k/v projections is re-laid out on every decode step otherwise, a third more bytes a token),
    recompiles every program that reads the weights for those layouts, and returns the weights
    in them. A mesh is needed (the layouts come with its shardings)."""
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params)
    self.weight_formats = self.lower_generate(abstract).compile().input_formats[0][0]
    self.fns = self._compile_fns()
    return jax.device_put(params, self.weight_formats)

  def _context(self):
    return sharding.activation_sharding(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _jit(self, fn, *, donate=(), state_out: str | None = None, in_shardings=None, static=()):
    """jax.jit under the mesh's activation rules; `state_out` names where the state is returned
    ("all" or "first" of a pair), so it keeps one sharding from call to call (no recompiles)."""
    def traced(*args):
      with self._context():
        return fn(*args)
    kwargs = {} if in_shardings is None else {"in_shardings": in_shardings}
    if static:
      kwargs["static_argnums"] = static
    if self.state_shardings is not None and state_out is not None:
      kwargs["out_shardings"] = self.state_shardings if state_out == "all" else (self.state_shardings, None)
    return jax.jit(traced, donate_argnums=donate, **kwargs)

  def _weights_in(self, *rest):
    """in_shardings for a program whose first argument is the weights: their pinned formats
    (None until `pin_weight_formats`), the other arguments `rest`."""
    return None if self.weight_formats is None else (self.weight_formats,) + rest

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

  def _init_state(self, length: int):
    b, vpad = self.slots, self.model_config.padded_vocab_size
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    zeros = lambda dtype, *shape: jnp.zeros((b,) + shape, dtype)
    return dict(
        cache=self._new_cache(b, length), token=zeros(jnp.int32), position=zeros(jnp.int32),
        count=zeros(jnp.int32), budget=zeros(jnp.int32), active=zeros(bool),
        key=zeros(jnp.uint32, *key_shape), temperature=jnp.ones((b,), jnp.float32),
        nucleus_cut=zeros(jnp.float32), penalty=jnp.ones((b,), jnp.float32), greedy=zeros(bool),
        logprobs=zeros(bool), stop=jnp.full((b, MAX_STOP_IDS), -1, jnp.int32),
        seen=sharding.constrain(zeros(bool, vpad), ("batch", "vocab")))

  def _compile_fns(self) -> dict[str, Any]:
    replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
    return dict(
        init=self._jit(self._init_state, state_out="all", static=(0,)),
        resize=self._jit(self._resize_impl, state_out="all", static=(1,)),
        copies=jax.jit(model_lib.decode_copies),
        prefill=self._jit(self._prefill_impl, in_shardings=self._weights_in(None, replicated, replicated)),
        insert=self._jit(self._insert_impl, donate=(0,), state_out="all"),
        release=self._jit(lambda state, slot: {**state, "active": state["active"].at[slot].set(False)},
                          donate=(0,), state_out="all"),
        generate=self._jit(self._generate_impl, donate=(2,), state_out="first",
                           in_shardings=self._weights_in(None, self.state_shardings)),
        score=self._jit(self._score_impl, in_shardings=self._weights_in(replicated)))

  def _resize_impl(self, state, length: int):
    """The state with its cache cut or zero-padded to `length` positions (what lies past a live
    answer's position is never read: `visible` masks it until the answer writes there)."""
    return dict(state, cache=attention.constrain_cache(attention.resize_cache(state["cache"], length)))

  def _prefill_impl(self, params, copies, tokens, length):
    width = tokens.shape[1]
    positions = jnp.arange(width, dtype=jnp.int32)[None]
    _, cache = model_lib.bind(self.model_config, params).decode(
        tokens, positions, self._new_cache(1, width), padded_vocab=True, copies=copies)
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

  def _generate_impl(self, params, copies, state):
    cfg = self.model_config
    model = model_lib.bind(cfg, params)
    k = self.top_logprobs
    rows = jnp.arange(self.slots)

    def step(s, _):
      logits, cache = model.decode(s["token"][:, None], s["position"][:, None], s["cache"],
                                   padded_vocab=True, copies=copies)
      raw = sampling.mask_padded_vocab(logits[:, 0].astype(jnp.float32), cfg.vocab_size)
      processed = sampling.process_logits_per_row(raw, s["seen"], s["penalty"], s["temperature"],
                                                  s["nucleus_cut"], s["greedy"])
      active = s["active"]
      token = jnp.where(s["greedy"], sampling.first_argmax(processed),
                        self._sample(processed, s["key"], s["count"], active & ~s["greedy"]))
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

  def _sample(self, processed, key_data, count, wanted):
    """Each row's draw with key fold_in(its key, its count), computed only when some slot samples
    (the Gumbel noise over the vocabulary costs as much as a large matmul on a CPU)."""
    def draw(processed):
      keys = jax.vmap(lambda d, i: jax.random.fold_in(jax.random.wrap_key_data(d), i))(key_data, count)
      return jax.vmap(sampling.categorical)(keys, processed)
    skip = lambda processed: jnp.zeros(processed.shape[:1], jnp.int32)
    return jax.lax.cond(jnp.any(wanted), draw, skip, processed)

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
