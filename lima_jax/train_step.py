"""The train state and the jitted steps: what one optimizer step computes, for any mesh.

The step is one `jax.jit` with explicit shardings (the design's "pjit"): the parameters and
AdamW moments are split over the mesh by the logical-axis rules of `lima_jax.sharding`, the
batch over its data axes, and the same code runs on one CPU, on simulated devices and on a TPU
slice with only the mesh changed. The state is created directly into its shards and never
gathered on one host. Nothing here looks at the devices, so `lima_jax.aot` compiles these very
programs for TPU topologies; `lima_jax.train` runs them.
"""

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax import fused_update
from lima_jax import lora as lora_lib
from lima_jax import metrics as metrics_lib
from lima_jax import model as model_lib
from lima_jax import optim
from lima_jax import sharding

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


def key_data_struct() -> jax.ShapeDtypeStruct:
  """Shape and dtype of a raw key under the configured PRNG implementation (threefry: uint32[2])."""
  return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value (the step counter, the key, the metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def _schedule_steps(config, total_steps: int | None) -> int:
  """The lr schedule's length: the run's, or a stand-in where only the program's shape matters."""
  return int(total_steps or config.train.max_steps or 1000)


def optimizer(config, total_steps: int | None) -> optax.GradientTransformation:
  """`config.optimizer` over the run's schedule length (see `_schedule_steps`)."""
  return optim.make_optimizer(config.optimizer, _schedule_steps(config, total_steps))


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
  tx = optimizer(config, total_steps)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  frozen = None
  if lora_lib.enabled(model_config):
    params = abstract_trainable(model_config)
    p_shard = trainable_shardings(model_config, mesh)
    base = lora_lib.base_config(model_config)
    frozen = jax.tree.map(with_sharding, model_lib.abstract_params(base), model_lib.param_shardings(base, mesh))
  else:
    params = model_lib.abstract_params(model_config)
    p_shard = model_lib.param_shardings(model_config, mesh)
  opt_state = jax.eval_shape(tx.init, params)
  o_shard = optim.opt_state_shardings(opt_state, params, p_shard, mesh)
  rep = replicated(mesh)
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
      params=jax.tree.map(with_sharding, params, p_shard),
      opt_state=jax.tree.map(with_sharding, opt_state, o_shard),
      rng=jax.ShapeDtypeStruct(key_data_struct().shape, key_data_struct().dtype, sharding=rep),
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
  tx = optimizer(config, total_steps)
  shards = state_shardings(abstract_train_state(config, model_config, mesh, total_steps))

  def init(params):
    init_key, base_key = jax.random.split(jax.random.key(seed))
    frozen = None
    if lora_lib.enabled(model_config):
      frozen = params if params is not None else model_lib.lora_base_params(model_config, seed)
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


def masked_loss(logits: jax.Array, batch: Mapping[str, jax.Array], denom: jax.Array) -> jax.Array:
  """The step's loss from padded logits: summed cross entropy over the loss-mask tokens / denom."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(losses * batch["loss_mask"]) / denom


def update_kind(config, model_config: model_lib.ModelConfig) -> str:
  """Which optimizer step `make_train_step` builds: "fused" (each layer updated in the
  backward pass, no whole-model gradient) or "ordinary"; see `lima_jax.fused_update`."""
  return fused_update.describe(config, model_config)[0]


def _accumulated_grads(micro_grads, dropout_key_or_none, state: TrainState, batch, denom,
                       micro: int, params_shardings):
  """(loss, gradient) summed over `micro` micro-batches in a scan (one fp32 accumulator)."""
  batch_size = batch["inputs"].shape[0]
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
    grad_sum = jax.lax.with_sharding_constraint(grad_sum, params_shardings)
    return (loss_sum + loss, grad_sum), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  zeros = jax.lax.with_sharding_constraint(zeros, params_shardings)
  (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                  (jnp.arange(micro), split))
  return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)


def _step_metrics(loss, grad_norm, lr, batch) -> dict:
  """What a step reports (METRIC_KEYS): loss, gradient norm, lr and its token counts."""
  return {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": lr,
      "loss_tokens": jnp.sum(batch["loss_mask"]),
      "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
      # Sum of squared sequence lengths: a sequence of length n has positions 0..n-1 and
      # sum(2p + 1) = n^2, the query-key pairs its (segment-local) attention computes.
      "attended": jnp.sum(jnp.where(batch["segment_ids"] > 0,
                                    2 * batch["positions"].astype(jnp.float32) + 1, 0.0)),
  }


METRIC_KEYS = ("loss", "grad_norm", "lr", "loss_tokens", "tokens", "attended")


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

  Where LIMA's recipe allows it (one micro-batch, no clipping, full fine-tuning;
  `train.fused_update`, on by default) the step is the fused one of `lima_jax.fused_update`:
  the same update with no whole-model gradient in memory. Which one runs is logged.
  """
  tx = optimizer(config, total_steps)
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
  kind, description = fused_update.describe(config, model_config)
  metrics_lib.log("%s", description)

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

  def ordinary_update(state, batch, denom):
    """(loss, gradient norm, new params, new optimizer state): the whole gradient, then `tx`."""
    if micro == 1:
      loss, grads = micro_grads(state.params, state.frozen, batch,
                                dropout_key_or_none(state, 0), denom)
    else:
      loss, grads = _accumulated_grads(micro_grads, dropout_key_or_none, state, batch, denom,
                                       micro, shards.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return loss, optax.tree.norm(grads), optax.apply_updates(state.params, updates), opt_state

  def step_fn(state: TrainState, batch):
    with sharding.activation_sharding(mesh):
      denom = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
      if kind == fused_update.FUSED:
        loss, grad_norm, params, opt_state = fused_update.loss_and_update(
            model_config, mesh, tx, state.params, state.opt_state, batch,
            dropout_key_or_none(state, 0), lambda logits: masked_loss(logits, batch, denom))
      else:
        loss, grad_norm, params, opt_state = ordinary_update(state, batch, denom)
      metrics = _step_metrics(loss, grad_norm, schedule(state.step), batch)
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      return new_state, metrics

  rep = replicated(mesh)
  metric_shards = {k: rep for k in METRIC_KEYS}
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
  rep = replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(params_shardings, batch_shardings), out_shardings=(rep, rep))
