"""LIMA fine-tuning: `python -m lima_jax.train --config=configs/lima.py:PRESET --workdir=DIR`.

The step is one `jax.jit` with explicit shardings (the design's "pjit"): the parameters and
AdamW moments are split over the mesh by the logical-axis rules of `lima_jax.sharding`, the
batch over its data axes, and the same code runs on one CPU, on simulated devices and on a TPU
slice with only `config.mesh` changed. The state is created (or restored) directly into its
shards and never gathered on one host.

Public pieces for other tools (e.g. ahead-of-time compilation for a TPU topology):
`make_train_step`, `abstract_train_state`, `abstract_batch`, `init_train_state`,
`make_eval_step`, `TrainState`.
"""

import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from etils import epath
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax import aot
from lima_jax import checkpoint as ckpt_lib
from lima_jax import data as data_lib
from lima_jax import hardware
from lima_jax import lora as lora_lib
from lima_jax import metrics as metrics_lib
from lima_jax import model as model_lib
from lima_jax import optim
from lima_jax import sampling
from lima_jax import sharding
from lima_jax import tokenizer as tokenizer_lib

BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
BATCH_LOGICAL_AXES = ("batch", "length")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, so it crosses `jit` and Orbax as is.

  `rng` is the run's base key (raw uint32 key data, so it serialises plainly); each step's
  dropout key is derived from it and the step number, never carried forward, so a resumed run
  draws the same masks as an uninterrupted one.

  With LoRA (`config.lora.rank` > 0) `params` are only the trainable adapters and rows (what the
  optimizer and the checkpoints see) and `frozen` the base weights, which no step changes.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  frozen: Any = None


def _key_data() -> jax.ShapeDtypeStruct:
  """Shape and dtype of a raw key under the configured PRNG implementation (threefry: uint32[2])."""
  return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _schedule_steps(config, total_steps: int | None) -> int:
  """The lr schedule's length: the run's, or a stand-in where only the program's shape matters."""
  return int(total_steps or config.train.max_steps or 1000)


def _optimizer(config, total_steps: int | None) -> optax.GradientTransformation:
  return optim.make_optimizer(config.optimizer, _schedule_steps(config, total_steps))


def param_shardings(model_config: model_lib.ModelConfig, mesh: Mesh):
  abstract = model_lib.abstract_params(model_config)
  return sharding.tree_shardings(model_lib.param_logical_axes(abstract), abstract, mesh)


def abstract_trainable(model_config: model_lib.ModelConfig) -> dict:
  """Shapes of a LoRA model's trainable tree (adapters + rows)."""
  return jax.eval_shape(lambda p: lora_lib.trainable_of(model_config, p),
                        model_lib.abstract_params(model_config))


def trainable_shardings(model_config: model_lib.ModelConfig, mesh: Mesh):
  abstract = abstract_trainable(model_config)
  return sharding.tree_shardings(lora_lib.trainable_logical_axes(abstract), abstract, mesh)


def full_params(model_config: model_lib.ModelConfig, state: TrainState):
  """The model's parameter tree of a state: for LoRA the base joined with the adapters and rows
  (outside jit no base weight is copied), else `state.params`."""
  if state.frozen is None:
    return state.params
  full = lora_lib.join(model_config, state.frozen, state.params)
  # The tables with their rows written back keep the base's layout (what the eval step expects).
  full["embed"] = {**full["embed"], "embedding": jax.device_put(
      full["embed"]["embedding"], state.frozen["embed"]["embedding"].sharding)}
  if "lm_head" in full:
    full["lm_head"] = jax.device_put(full["lm_head"], state.frozen["lm_head"].sharding)
  return full


def abstract_train_state(config, model_config: model_lib.ModelConfig, mesh: Mesh,
                         total_steps: int | None = None) -> TrainState:
  """The train state as jax.ShapeDtypeStruct leaves carrying their shardings; allocates nothing."""
  tx = _optimizer(config, total_steps)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  frozen = None
  if lora_lib.enabled(model_config):
    params = abstract_trainable(model_config)
    p_shard = trainable_shardings(model_config, mesh)
    base = lora_lib.base_config(model_config)
    frozen = jax.tree.map(with_sharding, model_lib.abstract_params(base), param_shardings(base, mesh))
  else:
    params = model_lib.abstract_params(model_config)
    p_shard = param_shardings(model_config, mesh)
  opt_state = jax.eval_shape(tx.init, params)
  o_shard = optim.opt_state_shardings(opt_state, params, p_shard, mesh)
  rep = _replicated(mesh)
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
      params=jax.tree.map(with_sharding, params, p_shard),
      opt_state=jax.tree.map(with_sharding, opt_state, o_shard),
      rng=jax.ShapeDtypeStruct(_key_data().shape, _key_data().dtype, sharding=rep),
      frozen=frozen)


def state_shardings(abstract_state: TrainState):
  return jax.tree.map(lambda x: x.sharding, abstract_state)


def batch_sharding(mesh: Mesh, batch_size: int, max_len: int) -> NamedSharding:
  """Rows over the data axes ("batch" -> data, fsdp), positions over "sequence"."""
  spec = sharding.logical_to_spec(BATCH_LOGICAL_AXES, mesh=mesh, shape=(batch_size, max_len))
  return NamedSharding(mesh, spec)


def abstract_batch(config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch a step takes: [train.batch_size, data.max_len] per key, sharded."""
  b, s = int(config.train.batch_size), int(config.data.max_len)
  shard = batch_sharding(mesh, b, s)
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
            "positions": jnp.int32, "segment_ids": jnp.int32}
  return {k: jax.ShapeDtypeStruct((b, s), dtypes[k], sharding=shard) for k in BATCH_KEYS}


def init_train_state(config, model_config: model_lib.ModelConfig, mesh: Mesh, seed: int,
                     params=None, total_steps: int | None = None) -> TrainState:
  """A fresh state, created inside `jit` straight into its shards.

  With `params` (e.g. pretrained weights already restored into their shards) only the optimizer
  state is created; otherwise the parameters are initialised from `seed`. Each device computes
  only its own slice (threefry is partitionable), so no host ever holds the full model. With
  LoRA, `params` is the base model (no adapters): it becomes `frozen`, and the adapters are
  drawn from `seed`.
  """
  tx = _optimizer(config, total_steps)
  shards = state_shardings(abstract_train_state(config, model_config, mesh, total_steps))

  def init(params):
    init_key, base_key = jax.random.split(jax.random.key(seed))
    frozen = None
    if lora_lib.enabled(model_config):
      frozen = params if params is not None else base_init(model_config, seed)
      params = lora_lib.init_trainable(model_config, frozen, jax.random.fold_in(init_key, 1))
    elif params is None:
      params = model_lib.init_params(model_config, init_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(base_key), frozen=frozen)

  if params is None:
    fn, args = jax.jit(lambda: init(None), out_shardings=shards), ()
  else:
    fn, args = jax.jit(init, out_shardings=shards, donate_argnums=0), (params,)
  # XLA:CPU spends seconds optimising each threefry kernel at its default level 2; level 1
  # compiles them ~8x faster and runs them as fast. The init runs once, so this is pure gain.
  cpu = mesh.devices.flat[0].platform == "cpu"
  options = {"xla_backend_optimization_level": 1} if cpu else None
  return fn.lower(*args).compile(compiler_options=options)(*args)


def base_init(model_config: model_lib.ModelConfig, seed: int) -> dict:
  """The random base of a LoRA model without a pretrained one: what full fine-tuning from
  `seed` would start from (pure, so a resumed run and `lima_jax.lora_io` rebuild it exactly)."""
  init_key, _ = jax.random.split(jax.random.key(seed))
  return model_lib.init_params(lora_lib.base_config(model_config), init_key)


def dropout_key(rng: jax.Array, step: jax.Array, micro_batch: int | jax.Array) -> jax.Array:
  """The dropout key of one micro-batch of one step: a pure function of (run key, step, index)."""
  key = jax.random.wrap_key_data(rng)
  return jax.random.fold_in(jax.random.fold_in(key, step), micro_batch)


def token_losses(model_config: model_lib.ModelConfig, params, batch: Mapping[str, jax.Array],
                 key: jax.Array | None) -> jax.Array:
  """Per-token cross entropy [B, S] (float32), computed on the padded-vocabulary logits.

  The padded logits sit at a large negative value, so they add nothing to the softmax while the
  vocabulary dimension keeps a size that splits evenly over the tensor axis.
  """
  model = model_lib.bind(model_config, params)
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                 dropout_key=key, padded_vocab=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def make_train_step(config, model_config: model_lib.ModelConfig, mesh: Mesh,
                    total_steps: int | None = None) -> tuple[Callable, TrainState, dict]:
  """The jitted optimizer step and the shardings it expects.

  Returns `(step_fn, state_shardings, batch_shardings)`; `step_fn(state, batch) -> (state,
  metrics)` donates the old state. `batch` is a dict of global arrays [train.batch_size,
  data.max_len] with keys `BATCH_KEYS`. The loss is the mean cross entropy over the loss-mask
  tokens of the whole global batch (so every trained token weighs the same, whatever the
  length of its conversation), and gradient accumulation over `train.micro_batches` divides by
  that same global count, making it equal to one big batch up to float summation order.
  `total_steps` sets the lr schedule's length; it does not change the compiled program's shape,
  so ahead-of-time compilation may leave it out. The mesh is an argument and nothing here looks
  at the devices, so the step lowers for any topology.
  """
  tx = _optimizer(config, total_steps)
  abstract = abstract_train_state(config, model_config, mesh, total_steps)
  shards = state_shardings(abstract)
  b_shards = {k: x.sharding for k, x in abstract_batch(config, mesh).items()}
  micro = int(config.train.micro_batches)
  batch_size = int(config.train.batch_size)
  if micro < 1 or batch_size % micro:
    raise ValueError(f"config.train.batch_size={batch_size} does not split into "
                     f"train.micro_batches={micro} equal micro-batches")
  schedule = optim.learning_rate_schedule(config.optimizer, _schedule_steps(config, total_steps))

  adapter_dropout = lora_lib.enabled(model_config) and model_config.lora.dropout > 0

  def dropout_key_or_none(state, index):
    # A zero rate would still draw a mask per residual; skip the work instead.
    if model_config.residual_dropout <= 0 and not adapter_dropout:
      return None
    return dropout_key(state.rng, state.step, index)

  def micro_grads(params, frozen, batch, key, denom):
    def loss_fn(p):
      full = p if frozen is None else lora_lib.join(model_config, frozen, p)
      losses = token_losses(model_config, full, batch, key)
      return jnp.sum(losses * batch["loss_mask"]) / denom
    return jax.value_and_grad(loss_fn)(params)

  def step_fn(state: TrainState, batch):
    with sharding.activation_sharding(mesh):
      denom = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
      if micro == 1:
        loss, grads = micro_grads(state.params, state.frozen, batch,
                                  dropout_key_or_none(state, 0), denom)
      else:
        # Row r of micro-batch m is global row r * micro + m: each device keeps its own rows.
        split = jax.tree.map(
            lambda x: sharding.constrain(
                x.reshape(batch_size // micro, micro, *x.shape[1:]).swapaxes(0, 1),
                (None, *BATCH_LOGICAL_AXES)), batch)

        def accumulate(carry, inputs):
          loss_sum, grad_sum = carry
          index, mb = inputs
          loss, grads = micro_grads(state.params, state.frozen, mb,
                                    dropout_key_or_none(state, index), denom)
          grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
          grad_sum = jax.lax.with_sharding_constraint(grad_sum, shards.params)
          return (loss_sum + loss, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, shards.params)
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                        (jnp.arange(micro), split))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {
          "loss": loss,
          "grad_norm": optax.tree.norm(grads),
          "lr": schedule(state.step),
          "loss_tokens": jnp.sum(batch["loss_mask"]),
          "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
      }
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      return new_state, metrics

  rep = _replicated(mesh)
  metric_shards = {k: rep for k in ("loss", "grad_norm", "lr", "loss_tokens", "tokens")}
  jitted = jax.jit(step_fn, in_shardings=(shards, b_shards), out_shardings=(shards, metric_shards),
                   donate_argnums=0)
  return jitted, shards, b_shards


def make_eval_step(model_config: model_lib.ModelConfig, mesh: Mesh, params_shardings,
                   batch_shardings) -> Callable:
  """Jitted (params, batch) -> (summed loss over loss-mask tokens, their count); no dropout."""
  def eval_fn(params, batch):
    with sharding.activation_sharding(mesh):
      losses = token_losses(model_config, params, batch, None)
      return jnp.sum(losses * batch["loss_mask"]), jnp.sum(batch["loss_mask"])
  rep = _replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(params_shardings, batch_shardings), out_shardings=(rep, rep))


# -- The training job ----------------------------------------------------------------------------


class BadDataError(Exception):
  """Input data (or the tokenizer) that cannot be trained on; the command exits with status 2."""


def maybe_initialize_distributed(config) -> None:
  """Joins the multi-host job when asked (`train.distributed`) or when the environment says so.

  On Cloud TPU (and SLURM, Open MPI), `jax.distributed.initialize()` finds the coordinator
  itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. CPU processes (tests, a cluster of CPU hosts) exchange collectives via gloo.
  """
  env = os.environ
  if not (config.train.get("distributed", False) or env.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  # Only CPU arrays use this (TPU collectives go over ICI/DCN); without it CPU processes
  # cannot run cross-process collectives at all.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)


def _log(message: str, *args) -> None:
  """A line for the user on process 0 (above the progress bar), also in the absl log."""
  logging.info(message, *args)
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"{time.strftime('%H:%M:%S')} {message % args if args else message}")


def _is_hf_dir(path: str) -> bool:
  return (epath.Path(path) / "config.json").is_file()


def load_run_tokenizer(config):
  """`data.tokenizer_path`; else the tokenizer of `model.init_from`; else the bundled one."""
  init_from = config.model.init_from
  if config.data.tokenizer_path or not init_from:
    return data_lib.tokenizer_from_config(config.data)
  if _is_hf_dir(init_from):
    return tokenizer_lib.load_tokenizer(init_from, eot=config.data.eot_token)
  blob = ckpt_lib.read_tokenizer_blob(init_from)
  if blob is None:
    raise FileNotFoundError(f"model.init_from={init_from} carries no tokenizer; set "
                            f"--config.data.tokenizer_path")
  return tokenizer_lib.load_tokenizer_from_blob(blob)


class RunData:
  """What the run reads before any weight or compile: tokenizer, train loader, dev sets."""

  def __init__(self, config):
    try:
      self.tokenizer = load_run_tokenizer(config)
      self.train = data_lib.make_train_loader(
          config.data, self.tokenizer, global_batch_size=int(config.train.batch_size),
          seed=int(config.data.shuffle_seed), num_epochs=int(config.train.epochs))
      self.dev = None
      self.dev_prompts: list[tuple[str, ...]] = []
      if config.data.dev_path or config.data.tfds_name or not config.data.train_path:
        self.dev = data_lib.make_eval_batches(config.data, self.tokenizer,
                                              global_batch_size=int(config.train.batch_size))
        conversations = data_lib.load_conversations(config.data, "dev")
        self.dev_prompts = [c.prompt_turns for c in conversations[:int(config.train.dev_generations)]]
        self.dev_prompt_ids = [data_lib.tokenize_prompt(self.tokenizer, turns).tolist()
                               for turns in self.dev_prompts]
    except (data_lib.DataError, FileNotFoundError, ValueError) as e:
      raise BadDataError(str(e)) from e


def run_mesh(config, devices=None) -> Mesh:
  """The training mesh: `config.mesh` as given, or (left at its default) the one that
  `hardware.mesh_for` picks for the batch, which is also the mesh `tools/aot_compile.py`
  compiles. Across several TPU slices the data axis spans the slices (data-center network).
  """
  devices = list(jax.devices() if devices is None else devices)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  sizes = hardware.mesh_for(config.mesh, len(devices), int(config.train.batch_size),
                            int(config.data.max_len), num_slices)
  if num_slices == 1:
    return sharding.make_mesh(sizes, devices)
  shape = sharding.mesh_shape(sizes, len(devices))
  if shape[0] % num_slices:
    raise ValueError(f"config.mesh.data={shape[0]} must be a multiple of the {num_slices} slices: "
                     f"the data axis is the one that crosses slices")
  ici = (shape[0] // num_slices,) + tuple(shape[1:])
  dcn = (num_slices,) + (1,) * (len(shape) - 1)
  array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return Mesh(np.asarray(array), sharding.MESH_AXES)


def build_model_config(config, tokenizer) -> model_lib.ModelConfig:
  """`config.model` with the vocabulary of the run's tokenizer, or a pretrained model's shapes.

  Starting from pretrained weights, the architecture is the checkpoint's; `config.model` still
  sets how it runs (dtypes, scan, remat, dropout, attention kernel). With `config.lora.rank` > 0
  the config also names the adapters, the rows that train (those the base lacks: EOT) and the
  base they adapt, and the base weights are held in `lora.base_dtype`.
  """
  fields = dict(config.model)
  init_from = config.model.init_from
  if init_from:
    from lima_jax import convert  # pylint: disable=g-import-not-at-top  # Only to start from weights.
    base = (convert.hf_config_to_model_config(init_from) if _is_hf_dir(init_from)
            else lora_lib.base_config(ckpt_lib.read_model_config(init_from)))
    runtime = ("param_dtype", "dtype", "scan_layers", "remat_policy", "residual_dropout", "attention")
    fields = {**base.to_dict(), **{k: fields[k] for k in runtime}}
    fields["vocab_size"] = max(base.vocab_size, tokenizer.vocab_size)
    base_vocab = base.vocab_size
  else:
    fields["vocab_size"] = tokenizer.vocab_size
    base_vocab = tokenizer.vocab_size
  lora_section = config.get("lora")
  fields["lora"] = lora_lib.from_run_config(
      lora_section, base_vocab_size=base_vocab, vocab_size=fields["vocab_size"],
      eot_id=tokenizer.eot_id, base=_absolute(init_from), base_seed=int(config.train.seed))
  if fields["lora"] is not None:
    fields["param_dtype"] = str(lora_section.get("base_dtype", "bfloat16"))
  return model_lib.ModelConfig.from_dict(fields)


def _absolute(path: str) -> str:
  """A local path made absolute (an adapter checkpoint names its base from anywhere); URLs as given."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def load_pretrained_params(config, model_config: model_lib.ModelConfig, mesh: Mesh):
  """Pretrained weights read straight into their shards, grown by the EOT row if needed."""
  from lima_jax import convert  # pylint: disable=g-import-not-at-top  # Only to start from weights.
  init_from = config.model.init_from
  if _is_hf_dir(init_from):
    base = convert.hf_config_to_model_config(init_from)
  else:
    base = ckpt_lib.read_model_config(init_from)
  saved_lora = base.lora
  base = lora_lib.base_config(base).replace(param_dtype=model_config.param_dtype)
  base_shards = param_shardings(base, mesh)
  if _is_hf_dir(init_from):
    params, _ = convert.load_hf_params(init_from, base_shards, dtype=model_config.param_dtype)
  elif saved_lora is not None:  # An adapter checkpoint: its base with the adapters merged in.
    from lima_jax import lora_io  # pylint: disable=g-import-not-at-top
    params = lora_io.load_merged_params(init_from, base_shards, dtype=model_config.param_dtype)
  else:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          model_lib.abstract_params(base), base_shards)
    params = ckpt_lib.restore_params(init_from, target)
  if base.vocab_size == model_config.vocab_size:
    return params
  grow = lambda p: convert.add_eot_row(p, base, model_config.vocab_size)[0]
  out_shards = param_shardings(lora_lib.base_config(model_config), mesh)
  return jax.jit(grow, out_shardings=out_shards, donate_argnums=0)(params)


def _lora_base(config, model_config: model_lib.ModelConfig, mesh: Mesh):
  """A LoRA run's frozen base, re-read on resume (the checkpoints hold only the adapters); None
  for full fine-tuning."""
  if not lora_lib.enabled(model_config):
    return None
  if config.model.init_from:
    return load_pretrained_params(config, model_config, mesh)
  base = lora_lib.base_config(model_config)
  return jax.jit(lambda: base_init(model_config, model_config.lora.base_seed),
                 out_shardings=param_shardings(base, mesh))()


def _host_array(value, sharding_: NamedSharding) -> jax.Array:
  """A global array from a host value that every process holds identically."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def _json_config(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _config_differences(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _config_differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out


class StopSignal:
  """SIGTERM (TPU preemption) -> save at the next step boundary and exit cleanly.

  One process catches the signal itself. Several processes must agree on the step, so there
  JAX's preemption sync point (which also listens for SIGTERM) decides.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return False
    return self.received

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def generate_dev_responses(config, model_config, params, mesh, run_data: RunData) -> list[dict]:
  """Answers the first `train.dev_generations` dev prompts with the run's decoding settings."""
  if not run_data.dev_prompts:
    return []
  scfg = sampling.SamplingConfig.from_dict(dict(config.sampling)).replace(
      max_new_tokens=int(config.train.dev_max_new_tokens))
  tok = run_data.tokenizer
  stop_ids = sorted({tok.eot_id, tok.eos_id} - {None})
  results = sampling.generate(model_config, params, run_data.dev_prompt_ids, sampling_config=scfg,
                              stop_ids=stop_ids, pad_id=tok.pad_id, bos_id=tok.bos_id, mesh=mesh)
  return [{"index": i, "conversation": list(turns), "response": tok.decode(r.tokens),
           "finish_reason": r.finish_reason, "response_tokens": r.response_tokens}
          for i, (turns, r) in enumerate(zip(run_data.dev_prompts, results))]


def evaluate_dev(eval_step, params, run_data: RunData, mesh: Mesh, spec) -> dict[str, float]:
  if run_data.dev is None:
    return {}
  total, count = 0.0, 0.0
  for local in run_data.dev.batches:
    loss_sum, n = eval_step(params, data_lib.to_global_batch(local, mesh, spec))
    total += float(loss_sum)
    count += float(n)
  loss = total / max(count, 1.0)
  return {"dev_loss": loss, "dev_perplexity": math.exp(min(loss, 80.0))}


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the job in `workdir`; returns a summary (final step, losses, why it ended)."""

  maybe_initialize_distributed(config)
  workdir = epath.Path(workdir)
  run_data = RunData(config)  # Bad data stops the run here, before any compile or weight load.
  steps_per_epoch = run_data.train.steps_per_epoch
  total_steps = int(config.train.epochs) * steps_per_epoch
  if config.train.max_steps:
    total_steps = min(total_steps, int(config.train.max_steps))
  _log("data: %s", run_data.train.stats.summary())
  _log("%d steps per epoch, %d epochs, %d optimizer steps of %d conversations", steps_per_epoch,
       config.train.epochs, total_steps, config.train.batch_size)

  mesh = run_mesh(config)
  model_config = build_model_config(config, run_data.tokenizer)
  _log("mesh %s over %d devices (%d processes); model %.1fM parameters",
       dict(mesh.shape), mesh.size, jax.process_count(), model_config.num_params() / 1e6)
  if lora_lib.enabled(model_config):
    _log("LoRA rank %d on %s: %.2fM trainable parameters, base frozen in %s (%s)",
         model_config.lora.rank, ",".join(model_config.lora.targets),
         lora_lib.num_trainable(model_config) / 1e6, model_config.param_dtype,
         model_config.lora.base or f"random init, seed {model_config.lora.base_seed}")
  step_fn, shards, b_shards = make_train_step(config, model_config, mesh, total_steps)
  batch_spec = next(iter(b_shards.values())).spec
  eval_step = make_eval_step(model_config, mesh, param_shardings(model_config, mesh), b_shards)

  manager = ckpt_lib.checkpoint_manager(workdir, keep=int(config.train.keep_checkpoints))
  latest = manager.latest_step()
  rep = _replicated(mesh)
  if latest is not None:
    abstract = abstract_train_state(config, model_config, mesh, total_steps)
    params, opt_state, meta = ckpt_lib.restore_training(
        manager, latest, params_target=abstract.params, opt_state_target=abstract.opt_state)
    rng = np.asarray(meta["rng"], _key_data().dtype)
    state = TrainState(step=_host_array(np.int32(meta["step"]), rep), params=params,
                       opt_state=opt_state, rng=_host_array(rng, rep),
                       frozen=_lora_base(config, model_config, mesh))
    run_data.train.set_state(meta["data"])
    differences = _config_differences(meta.get("config", {}), _json_config(config))
    _log("resumed from %s at step %d", manager.directory / str(latest), meta["step"])
    if differences:
      _log("the config differs from the checkpoint's: %s", "; ".join(differences))
  else:
    params = load_pretrained_params(config, model_config, mesh) if config.model.init_from else None
    state = init_train_state(config, model_config, mesh, int(config.train.seed), params, total_steps)
  start_step = int(jax.device_get(state.step))

  def save(step: int) -> None:
    meta = {"step": step, "epoch": step / steps_per_epoch,
            "rng": np.asarray(jax.device_get(state.rng)).tolist(),
            "data": run_data.train.get_state(), "config": _json_config(config),
            "total_steps": total_steps, "mesh": dict(mesh.shape)}
    if ckpt_lib.save_training(manager, step, params=state.params, opt_state=state.opt_state,
                              model_config=model_config, tokenizer_blob=run_data.tokenizer.to_blob(),
                              train_state=meta):
      _log("saving checkpoint %s", manager.directory / str(step))

  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
  peak, peak_source = metrics_lib.peak_flops(float(config.train.peak_flops_per_device))
  _log("peak FLOP/s per device for MFU: %.3g (%s)", peak, peak_source)
  flops = aot.train_flops(model_config, int(config.train.batch_size), int(config.data.max_len))
  stop = StopSignal()
  bar = metrics_lib.ProgressBar(total_steps, start_step)
  summary: dict[str, Any] = {"start_step": start_step, "total_steps": total_steps, "losses": []}
  ended = "finished"
  compile_start = time.perf_counter()
  compiled_step = step_fn.lower(state, abstract_batch(config, mesh)).compile()
  _log("compiled the train step in %.1f s", time.perf_counter() - compile_start)
  last = time.perf_counter()
  try:
    step = start_step
    while step < total_steps:
      epoch, local_batch = next(run_data.train)
      batch = data_lib.to_global_batch(local_batch, mesh, batch_spec)
      state, step_metrics = compiled_step(state, batch)
      step_metrics = jax.device_get(step_metrics)
      step += 1
      now = time.perf_counter()
      step_time, last = now - last, now
      loss = float(step_metrics["loss"])
      summary["losses"].append(loss)
      if step % int(config.train.log_every_steps) == 0 or step == total_steps:
        writer.write(step, {
            "loss": loss, "lr": step_metrics["lr"], "grad_norm": step_metrics["grad_norm"],
            "epoch": step / steps_per_epoch, "step_time_s": step_time,
            "tokens_per_s": step_metrics["tokens"] / step_time,
            "mfu": flops["model"] / step_time / (peak * mesh.size) if peak else 0.0,
            "hfu": flops["hardware"] / step_time / (peak * mesh.size) if peak else 0.0})
      bar.update({"epoch": f"{epoch + 1}", "loss": f"{loss:.4f}",
                  "lr": f"{float(step_metrics['lr']):.2e}"})
      epoch_end = step % steps_per_epoch == 0
      every = int(config.train.checkpoint_every_steps)
      periodic = every > 0 and step % every == 0
      preempted = stop.should_stop(step)
      stopping = preempted or step == int(config.train.get("stop_at_step", 0))
      if epoch_end or periodic or stopping or step == total_steps:
        save(step)
      if epoch_end and not preempted:  # A preempted host has seconds left: only the save counts.
        done = step // steps_per_epoch
        dev = evaluate_dev(eval_step, full_params(model_config, state), run_data, mesh, batch_spec)
        if dev:
          writer.write(step, dev, flush=True)
          _log("epoch %d: dev loss %.4f, perplexity %.2f", done, dev["dev_loss"], dev["dev_perplexity"])
        summary.update(dev)
        generations = generate_dev_responses(config, model_config, full_params(model_config, state),
                                             mesh, run_data)
        if generations and jax.process_index() == 0:
          records = [{"epoch": done, "step": step, **g} for g in generations]
          (workdir / "dev_generations").mkdir(parents=True, exist_ok=True)
          metrics_lib.write_text_atomic(workdir / "dev_generations" / f"epoch_{done}.jsonl",
                                        "".join(json.dumps(r) + "\n" for r in records))
        summary["generations"] = generations
        last = time.perf_counter()  # Evaluation time is not step time.
      if stopping:
        ended = "stopped"
        break
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    stop.restore()
  summary.update(final_step=step, ended=ended, state=state, model_config=model_config)
  _log("%s at step %d of %d; checkpoints in %s", ended, step, total_steps, manager.directory)
  return summary


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("workdir", config.preset)
  try:
    summary = train_and_evaluate(config, workdir)
  except BadDataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    for g in summary.get("generations", []):
      print(f"\n### dev prompt {g['index']}: {g['conversation'][-1]}\n{g['response']}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "lima.py:tiny"),
      "A configs/lima.py preset, e.g. configs/lima.py:7b; override fields with --config.a.b=v.",
      lock_config=False)  # Locking fails on the FrozenConfigDict of model.rope_scaling.
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://); default ./workdir/<preset>.")
  hardware.default_to_cpu_without_tpu()
  hardware.restart_with_cpu_allocator()
  app.run(main)
