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
import subprocess
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
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax import aot
from lima_jax import checkpoint as ckpt_lib
from lima_jax import data as data_lib
from lima_jax import errors
from lima_jax import hardware
from lima_jax import lora as lora_lib
from lima_jax import metrics as metrics_lib
from lima_jax import model as model_lib
from lima_jax import optim
from lima_jax import paths
from lima_jax import sampling
from lima_jax import sharding
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.convert import model_readers

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


param_shardings = model_lib.param_shardings  # One definition, beside the parameters' logical axes.


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
      frozen = params if params is not None else model_readers.base_init(model_config, seed)
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
          # Sum of squared sequence lengths: a sequence of length n has positions 0..n-1 and
          # sum(2p + 1) = n^2, the query-key pairs its (segment-local) attention computes.
          "attended": jnp.sum(jnp.where(batch["segment_ids"] > 0,
                                        2 * batch["positions"].astype(jnp.float32) + 1, 0.0)),
      }
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      return new_state, metrics

  rep = _replicated(mesh)
  metric_shards = {k: rep for k in ("loss", "grad_norm", "lr", "loss_tokens", "tokens", "attended")}
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


class BadDataError(errors.InputError):
  """Input data (or the tokenizer) that cannot be trained on; the command exits with status 2."""


class ConfigError(errors.InputError):
  """Config fields that contradict each other or the checkpoint; found before any compile, exit 2."""


# Exit status of a process whose peer was lost (killed, preempted, crashed): rerun all hosts.
EXIT_PEER_LOST = 3
_peer_loss_hint = {"workdir": None, "saved_step": None}


def peer_lost(reason: str) -> None:
  """Says that a peer process is gone and how to resume, then ends this process at once.

  Called from the training loop when a collective fails because its peer is gone (CPU's gloo
  says so at once). It exits without cleanup: waiting for saves or barriers that need the dead
  peer would hang, and every checkpoint on disk is either committed or never counted.
  """
  n, i = jax.process_count(), jax.process_index()
  workdir = _peer_loss_hint["workdir"] or "the same directory"
  saved = _peer_loss_hint["saved_step"]
  first_line = reason.strip().splitlines()[0][:400] if reason.strip() else "no detail"
  since = f" (the last save started was step {saved})" if saved is not None else ""
  sys.stdout.flush()
  sys.stderr.write(
      f"\nerror: process {i} of {n} lost a peer process: another host of this run was killed, "
      f"preempted or crashed ({first_line}).\n"
      f"To resume, rerun the same command on all {n} hosts with the same --workdir={workdir}: "
      f"the run continues from the newest finished checkpoint there{since}.\n")
  sys.stderr.flush()
  if _reporter is not None:
    _reporter.orderly_exit()
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access


def _looks_like_lost_peer(error: Exception) -> bool:
  """True for the runtime errors a dead peer causes in a cross-process collective or RPC (not
  for timeouts: a slow peer is not a lost one)."""
  text = str(error).lower()
  return any(marker in text for marker in (
      "connection closed", "connection reset", "connection refused", "socket closed",
      "heartbeat", "unavailable:"))


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of the coordination service (no device collective) across the job's processes.

  Processes finish compiling at different times (one hits the compilation cache, another not),
  and the first cross-process collective gives up early: CPU's gloo sets up its context then,
  and waits 30 s for the peers.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if jax.process_count() > 1 and client is not None:
    client.wait_at_barrier(f"lima_jax:{name}", timeout_in_ms=timeout_s * 1000)


# Run beside each process of a multi-process job: it reads its stdin until the training process
# ends, however it ends, and speaks where that process could not (an abort from C++).
_WATCHER = """
import os, sys
if b"ok" not in sys.stdin.buffer.read():
  os.write(2, sys.argv[1].encode())
"""


class _AbnormalEndReporter:
  """Says how to resume when this process of a multi-process job dies without a word.

  When a peer host is lost, JAX's distributed runtime ends the survivors from C++ (a missed
  heartbeat, 100 s by default, or the coordinator's socket closing; "Terminating process because
  the JAX distributed service detected fatal errors"), before any Python handler can run: its
  error callback cannot be given a Python function (jaxlib 0.10.2 fails to convert the status
  it passes). So a small watcher process holds a pipe from this one; if the pipe closes without
  the "ok" that every orderly exit sends, the watcher prints the guidance on the same stderr.
  """

  def __init__(self, workdir: str):
    n, i = jax.process_count(), jax.process_index()
    message = (
        f"\nerror: process {i} of {n} of this run ended abnormally. If a peer host was lost "
        f"(killed, preempted or crashed), JAX's distributed runtime ends the survivors this way "
        f"(see 'Terminating process because the JAX distributed service detected fatal errors' "
        f"above).\nTo resume, rerun the same command on all {n} hosts with the same "
        f"--workdir={workdir}: the run continues from the newest finished checkpoint there.\n")
    self._proc = subprocess.Popen([sys.executable, "-c", _WATCHER, message], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, start_new_session=True)

  def orderly_exit(self) -> None:
    """Tells the watcher that this exit is explained (a normal end, or a message printed)."""
    try:
      self._proc.stdin.write(b"ok")
      self._proc.stdin.close()
    except (OSError, ValueError):
      pass


_reporter: _AbnormalEndReporter | None = None
_report_abnormal_end = False  # The command line (`main`) asks for the watcher; library use does not.


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
  global _reporter
  if _report_abnormal_end and jax.process_count() > 1 and _reporter is None:
    _reporter = _AbnormalEndReporter(_peer_loss_hint["workdir"] or "the same directory")


def _log(message: str, *args) -> None:
  """A line for the user on process 0 (above the progress bar), also in the absl log."""
  logging.info(message, *args)
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"{time.strftime('%H:%M:%S')} {message % args if args else message}")


def _warn(message: str, *args) -> None:
  """A warning every process logs, and process 0 also prints."""
  logging.warning(message, *args)
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"{time.strftime('%H:%M:%S')} warning: {message % args if args else message}")


_is_hf_dir = ckpt_lib.is_hf_dir


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
  max_len, max_seq_len = int(config.data.max_len), int(fields["max_seq_len"])
  if max_len > max_seq_len:
    if init_from:
      raise ConfigError(
          f"data.max_len={max_len} is longer than the pretrained model's context: model.init_from="
          f"{init_from} has max_position_embeddings={max_seq_len}, and lima_jax does not "
          f"extrapolate RoPE; set --config.data.max_len={max_seq_len} (or less)")
    raise ConfigError(
        f"data.max_len={max_len} is longer than model.max_seq_len={max_seq_len} (RoPE would run "
        f"past the positions the model is made for); set --config.data.max_len={max_seq_len} or "
        f"--config.model.max_seq_len={max_len}")
  return model_lib.ModelConfig.from_dict(fields)


def _absolute(path: str) -> str:
  """A local path made absolute (an adapter checkpoint names its base from anywhere); URLs as given."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _declares_eot(init_from: str, tokenizer) -> bool:
  """True where a Hugging Face directory's tokenizer_config.json names the EOT text at its id,
  as a lima_jax export (tools/convert_weights.py orbax-to-hf) writes it: the row is trained."""
  config_file = paths.path(init_from) / tokenizer_lib.HF_CONFIG_FILE
  if not config_file.is_file():
    return False
  try:
    decoder = json.loads(config_file.read_text()).get("added_tokens_decoder") or {}
  except (OSError, ValueError):
    return False
  entry = decoder.get(str(tokenizer.eot_id)) or {}
  return entry.get("content") == tokenizer.eot_text


def needs_fresh_eot_row(init_from: str, base_vocab_size: int, tokenizer) -> bool:
  """True where the pretrained rows already cover the EOT id but none of them is EOT's own.

  Models that pad their embedding past the tokenizer (e.g. 32064 rows for 32000 pieces) put
  EOT's id (the tokenizer's size) on a padding row. A lima_jax training checkpoint, or a model
  whose rows end exactly at EOT, or an export that declares EOT, already trained that row.
  """
  eot = tokenizer.eot_id
  if base_vocab_size <= eot or base_vocab_size == tokenizer.vocab_size:
    return False
  if _is_hf_dir(init_from):
    return not _declares_eot(init_from, tokenizer)
  return not (ckpt_lib.resolve(init_from) / ckpt_lib.TRAIN_STATE).is_dir()


def load_pretrained_params(config, model_config: model_lib.ModelConfig, mesh: Mesh, tokenizer=None):
  """Pretrained weights read straight into their shards, with a row for EOT at the mean.

  EOT gets a fresh row: appended where the embedding ends before its id, or, where the
  embedding is padded past the tokenizer (`needs_fresh_eot_row`; needs `tokenizer`), the
  padding row at its id overwritten with the mean of the tokenizer's rows.
  """
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
    params = model_readers.load_merged_params(init_from, base_shards, dtype=model_config.param_dtype)
  else:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          model_lib.abstract_params(base), base_shards)
    params = ckpt_lib.restore_params(init_from, target)
  if base.vocab_size == model_config.vocab_size:
    if tokenizer is None or not needs_fresh_eot_row(init_from, base.vocab_size, tokenizer):
      return params
    _log("model.init_from has %d rows for %d tokenizer ids: EOT (id %d) gets a fresh row at the "
         "mean of the first %d, over the padding row there", base.vocab_size, tokenizer.vocab_size,
         tokenizer.eot_id, tokenizer.base_vocab_size)
    fresh = lambda p: convert.set_rows_to_mean(p, (tokenizer.eot_id,), tokenizer.base_vocab_size)
    return jax.jit(fresh, out_shardings=param_shardings(lora_lib.base_config(model_config), mesh),
                   donate_argnums=0)(params)
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
  return jax.jit(lambda: model_readers.base_init(model_config, model_config.lora.base_seed),
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
  JAX's preemption sync point (which also listens for SIGTERM) decides; where it is not set up
  (`jax_enable_preemption_service` off, or the job joined without `jax.distributed`), the log
  says so at start-up rather than handling preemption silently not at all.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self.enabled = True
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    elif not self.multihost_sync_available():
      self._disable("JAX's preemption sync manager is not set up (is jax_enable_preemption_service "
                    "off, or was jax.distributed initialised without it?)")

  @staticmethod
  def multihost_sync_available() -> bool:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None

  def _disable(self, why: str) -> None:
    self.enabled = False
    _warn("preemption handling is OFF: %s. A SIGTERM now ends the hosts without a final save; "
          "a rerun resumes from the newest finished checkpoint", why)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True

  def should_stop(self, step: int) -> bool:
    if not self.enabled:
      return False
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:
        self._disable(f"reached_preemption_sync_point failed: {e}")
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
                              stop_ids=stop_ids, pad_id=tok.pad_id, bos_id=tok.bos_id, mesh=mesh,
                              sample_vocab=tok.vocab_size)
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


def finished_step(workdir, total_steps: int) -> int | None:
  """The newest checkpoint's step when the run is already done, else None: a rerun then stops
  before any peak-FLOP/s measurement or compile."""
  directory = paths.path(workdir) / ckpt_lib.CHECKPOINTS_SUBDIR
  if not directory.is_dir():
    return None
  try:
    step = int(ckpt_lib.resolve(directory).name)
  except (FileNotFoundError, ValueError):
    return None
  return step if step >= total_steps else None


def parse_epochs(spec: str, field: str = "train.keep_epochs") -> frozenset[int] | None:
  """"5-10" or "5,8,10" (or a mix, "1,5-10") -> those epoch numbers; "" -> None (all)."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  epochs = set()
  try:
    for part in spec.split(","):
      first, dash, last = part.strip().partition("-")
      first, last = int(first), int(last if dash else first)
      if first < 1 or last < first:
        raise ValueError(part)
      epochs.update(range(first, last + 1))
  except ValueError:
    raise ConfigError(f"{field}={spec!r}: expected epoch numbers from 1 as ranges and lists, e.g. "
                      f"\"5-10\" or \"5,8,10\" (\"\" keeps every epoch)") from None
  return frozenset(epochs)


def superseded_steps(finished: list[int], keep_epochs: frozenset[int] | None,
                     steps_per_epoch: int) -> list[int]:
  """Finished steps to delete under `train.keep_epochs`: all but the newest (the resume point)
  that are not the end of a kept epoch (periodic and preemption saves included)."""
  if keep_epochs is None or not finished:
    return []
  kept = lambda s: s % steps_per_epoch == 0 and s // steps_per_epoch in keep_epochs
  return [s for s in finished[:-1] if not kept(s)]


def resume_state(config, model_config, mesh: Mesh, manager, run_data: RunData,
                 total_steps: int) -> TrainState | None:
  """The state of the newest step in the workdir that an exact resume can start from, or None.

  A step resumes exactly only with its `opt_state/`; with `train.keep_optimizer_state=latest`
  older steps keep only their parameters. Steps newer than the newest resumable one are named
  in the log and redone. Where no step keeps an optimizer state at all (e.g. it was deleted by
  hand), the run continues from the newest parameters with fresh AdamW moments (their step
  counters, hence the lr schedule, continue) and the log says that this is not exact.
  """
  finished = ckpt_lib.finished_steps(manager)
  if not finished:
    return None
  resumable = ckpt_lib.resumable_steps(manager)
  rep = _replicated(mesh)
  abstract = abstract_train_state(config, model_config, mesh, total_steps)
  step = resumable[-1] if resumable else finished[-1]
  params, opt_state, meta = ckpt_lib.restore_training(
      manager, step, params_target=abstract.params,
      opt_state_target=abstract.opt_state if resumable else None)
  if opt_state is None:
    _warn("no checkpoint in %s keeps its optimizer state (opt_state/); continuing from step %d's "
          "parameters with fresh AdamW moments: NOT an exact resume", manager.directory, step)
    fresh = jax.jit(_optimizer(config, total_steps).init,
                    out_shardings=state_shardings(abstract).opt_state)(params)
    opt_state = _with_step_counts(fresh, int(meta["step"]))
  elif step != finished[-1]:
    _warn("steps %s keep no optimizer state; resuming exactly from step %d, the newest that does, "
          "and training the later steps again", [s for s in finished if s > step], step)
  rng = np.asarray(meta["rng"], _key_data().dtype)
  state = TrainState(step=_host_array(np.int32(meta["step"]), rep), params=params,
                     opt_state=opt_state, rng=_host_array(rng, rep),
                     frozen=_lora_base(config, model_config, mesh))
  run_data.train.set_state(meta["data"])
  differences = _config_differences(meta.get("config", {}), _json_config(config))
  _log("resumed from %s at step %d", manager.directory / str(step), meta["step"])
  if differences:
    _log("the config differs from the checkpoint's: %s", "; ".join(differences))
  return state


def _with_step_counts(opt_state, step: int):
  """The optimizer state with every step counter (optax's `count` fields) set to `step`."""
  def set_count(path, leaf):
    if path and getattr(path[-1], "name", None) == "count":
      return _host_array(np.asarray(step, leaf.dtype), leaf.sharding)
    return leaf
  return jax.tree_util.tree_map_with_path(set_count, opt_state)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the job in `workdir`; returns a summary (final step, losses, why it ended)."""

  workdir = paths.path(workdir)
  _peer_loss_hint["workdir"] = str(workdir)
  maybe_initialize_distributed(config)
  keep_opt = str(config.train.get("keep_optimizer_state", "latest"))
  if keep_opt not in ckpt_lib.KEEP_OPTIMIZER_STATE:
    raise ConfigError(f"train.keep_optimizer_state={keep_opt!r}; expected one of "
                      f"{', '.join(ckpt_lib.KEEP_OPTIMIZER_STATE)}")
  keep_epochs = parse_epochs(config.train.get("keep_epochs", ""))
  run_data = RunData(config)  # Bad data stops the run here, before any compile or weight load.
  steps_per_epoch = run_data.train.steps_per_epoch
  total_steps = int(config.train.epochs) * steps_per_epoch
  if config.train.max_steps:
    total_steps = min(total_steps, int(config.train.max_steps))
  _log("data: %s", run_data.train.stats.summary())
  _log("%d steps per epoch, %d epochs, %d optimizer steps of %d conversations", steps_per_epoch,
       config.train.epochs, total_steps, config.train.batch_size)
  done = finished_step(workdir, total_steps)
  if done is not None:
    _log("already finished: %s holds step %d of %d; nothing to do (another --workdir starts a "
         "new run)", workdir / ckpt_lib.CHECKPOINTS_SUBDIR, done, total_steps)
    return {"start_step": done, "total_steps": total_steps, "losses": [], "final_step": done,
            "ended": "finished"}

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
  state = resume_state(config, model_config, mesh, manager, run_data, total_steps)
  if state is None:
    params = (load_pretrained_params(config, model_config, mesh, run_data.tokenizer)
              if config.model.init_from else None)
    state = init_train_state(config, model_config, mesh, int(config.train.seed), params, total_steps)
  start_step = int(jax.device_get(state.step))

  def prune() -> None:
    """Drops what no committed newer step needs: the optimizer state of older steps (by
    default), and the steps `train.keep_epochs` leaves out. Runs with no save in flight."""
    if keep_opt == "latest":
      pruned = ckpt_lib.prune_optimizer_state(manager)
      if pruned:
        logging.info("deleted opt_state/ of steps %s (train.keep_optimizer_state=latest)", pruned)
    for step in superseded_steps(ckpt_lib.finished_steps(manager), keep_epochs, steps_per_epoch):
      manager.delete(step)  # Every process calls it (Orbax syncs them); process 0 deletes.
      logging.info("deleted checkpoint %d (not an epoch in train.keep_epochs)", step)

  def save(step: int) -> None:
    meta = {"step": step, "epoch": step / steps_per_epoch,
            "rng": np.asarray(jax.device_get(state.rng)).tolist(),
            "data": run_data.train.get_state(), "config": _json_config(config),
            "total_steps": total_steps, "mesh": dict(mesh.shape)}
    # Orbax would wait for the previous save here anyway; once it is committed, the state
    # before it is no longer needed to resume.
    manager.wait_until_finished()
    prune()
    if ckpt_lib.save_training(manager, step, params=state.params, opt_state=state.opt_state,
                              model_config=model_config, tokenizer_blob=run_data.tokenizer.to_blob(),
                              train_state=meta):
      _peer_loss_hint["saved_step"] = step
      _log("saving checkpoint %s", manager.directory / str(step))

  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
  peak, peak_source = metrics_lib.peak_flops(float(config.train.peak_flops_per_device))
  _log("peak FLOP/s per device for MFU: %.3g (%s)", peak, peak_source)
  batch_size, max_len = int(config.train.batch_size), int(config.data.max_len)
  stop = StopSignal()
  bar = metrics_lib.ProgressBar(total_steps, start_step)
  summary: dict[str, Any] = {"start_step": start_step, "total_steps": total_steps, "losses": []}
  ended = "finished"
  compile_start = time.perf_counter()
  compiled_step = step_fn.lower(state, abstract_batch(config, mesh)).compile()
  _log("compiled the train step in %.1f s", time.perf_counter() - compile_start)
  wait_for_all_processes("train_step_compiled")
  last = time.perf_counter()
  epoch_tokens = [0.0, 0.0]  # Non-pad tokens and all positions of the epoch's batches so far.
  try:
    step = start_step
    while step < total_steps:
      epoch, local_batch = next(run_data.train)
      batch = data_lib.to_global_batch(local_batch, mesh, batch_spec)
      try:
        state, step_metrics = compiled_step(state, batch)
        step_metrics = jax.device_get(step_metrics)
      except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1 and _looks_like_lost_peer(e):
          peer_lost(str(e))
        raise
      step += 1
      now = time.perf_counter()
      step_time, last = now - last, now
      loss = float(step_metrics["loss"])
      summary["losses"].append(loss)
      tokens = float(step_metrics["tokens"])
      epoch_tokens = [epoch_tokens[0] + tokens, epoch_tokens[1] + batch_size * max_len]
      if step % int(config.train.log_every_steps) == 0 or step == total_steps:
        # MFU and tokens/s count only real tokens (and attention within each real sequence);
        # HFU counts the padded program the chips run.
        flops = aot.train_flops(model_config, batch_size, max_len, tokens=tokens,
                                attended=float(step_metrics["attended"]))
        writer.write(step, {
            "loss": loss, "lr": step_metrics["lr"], "grad_norm": step_metrics["grad_norm"],
            "epoch": step / steps_per_epoch, "step_time_s": step_time,
            "tokens_per_s": tokens / step_time,
            "padding_share": 1.0 - tokens / (batch_size * max_len),
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
        writer.flush()  # metrics.jsonl covers every step a resume from this checkpoint keeps.
        save(step)
      if epoch_end:
        padding = 1.0 - epoch_tokens[0] / max(epoch_tokens[1], 1.0)
        writer.write(step, {"epoch_padding_share": padding})
        _log("epoch %d: %.1f%% of the batch positions were padding (MFU and tokens/s leave them out)",
             step // steps_per_epoch, 100 * padding)
        epoch_tokens = [0.0, 0.0]
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
          paths.write_text_atomic(workdir / "dev_generations" / f"epoch_{done}.jsonl",
                                  "".join(json.dumps(r) + "\n" for r in records))
        summary["generations"] = generations
        last = time.perf_counter()  # Evaluation time is not step time.
      if stopping:
        ended = "stopped"
        break
  finally:
    bar.close()
    manager.wait_until_finished()
    prune()
    manager.close()
    writer.close()
    stop.restore()
  summary.update(final_step=step, ended=ended, state=state, model_config=model_config)
  _log("%s at step %d of %d; checkpoints in %s", ended, step, total_steps, manager.directory)
  return summary


def main(argv) -> None:
  """The command's body; `lima_jax.cli.train` defines its flags (--config, --workdir) and runs it."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("workdir", config.preset)
  global _report_abnormal_end
  _report_abnormal_end = True
  try:
    summary = train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      for g in summary.get("generations", []):
        print(f"\n### dev prompt {g['index']}: {g['conversation'][-1]}\n{g['response']}")
  finally:
    # Leave the job here rather than at interpreter exit, so that an abort in the shutdown
    # barrier (a peer died meanwhile) still leaves the watcher to explain it.
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()
    if _reporter is not None:
      _reporter.orderly_exit()


if __name__ == "__main__":
  from lima_jax.cli import train as train_cli  # pylint: disable=g-import-not-at-top
  train_cli.run()
