"""The layer-wise fused optimizer step: each layer's AdamW update is applied as soon as the
backward pass has produced that layer's gradient, so no whole-model gradient ever exists.

An ordinary step holds the gradient of every parameter (4 bytes a parameter, as much as the
fp32 weights) between the backward pass and the update. LIMA's recipe (one micro-batch, no
clipping) needs nothing of the gradient but each parameter's own AdamW update, so here the
backward pass is written out: the forward scan over layers keeps each layer's pullback
(its residuals, as `jax.vjp` under the model's remat policy leaves them; the layer's weights are
not copied, they are read back from the stacked parameters), and the reverse scan carries the
stacked parameters and moments, computes one layer's gradient, applies the optimizer to that
layer's slice and writes the new slice in place. The head and final norm are updated right
after their gradient, the embedding after the last layer's. The update rule is the optimizer's
own `tx.update` applied to each slice (AdamW is elementwise, its counters are shared), so the
result equals the ordinary step's to float rounding.
"""

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lima_jax import lora as lora_lib
from lima_jax import model as model_lib
from lima_jax import sharding

FUSED = "fused"
ORDINARY = "ordinary"


def why_not_fused(config, model_config: model_lib.ModelConfig) -> str | None:
  """None when the fused step applies to this run; else why the ordinary step runs."""
  if not config.train.get("fused_update", True):
    return "train.fused_update=False"
  if float(config.optimizer.get("grad_clip_norm", 0.0)) > 0:
    return "clipping by global norm (optimizer.grad_clip_norm) needs the whole gradient first"
  if int(config.train.micro_batches) > 1:
    return "gradient accumulation (train.micro_batches > 1) sums whole gradients"
  if lora_lib.enabled(model_config):
    return "LoRA trains only the adapters and rows (a small gradient)"
  if not model_config.scan_layers:
    return "model.scan_layers=False (the fused step updates scanned layers)"
  return None


def describe(config, model_config: model_lib.ModelConfig) -> tuple[str, str]:
  """(FUSED or ORDINARY, a line for the log saying which optimizer step runs and why)."""
  reason = why_not_fused(config, model_config)
  if reason is None:
    return FUSED, ("fused optimizer step: each layer's AdamW update is applied in the backward "
                   "pass (no whole-model gradient is held)")
  return ORDINARY, f"ordinary optimizer step (gradient, then update): {reason}"


def _key(path) -> str:
  return jax.tree_util.keystr(path)


def _is_param_leaf(path) -> bool:
  """Parameter-shaped optimizer leaves sit under the parameter's dict keys; counters do not."""
  return any(isinstance(k, jax.tree_util.DictKey) for k in path)


def _under(path, top: str) -> bool:
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return bool(keys) and keys[0] == top


class _SlicedOptimizer:
  """`tx` applied to a part of the parameters (a subtree with the same keys from the root),
  reading and writing the matching part of the whole optimizer state."""

  def __init__(self, tx: optax.GradientTransformation):
    self.tx = tx

  def update(self, grads, params, leaf_of: Callable[[str], jax.Array]):
    """(new params, {state path: new leaf}) for the part; `leaf_of(path)` gives the current
    state leaf at a path of the whole state (a parameter's slice, or a shared counter)."""
    template = jax.eval_shape(self.tx.init, params)
    state = jax.tree_util.tree_map_with_path(lambda p, _: leaf_of(_key(p)), template)
    updates, new_state = self.tx.update(grads, state, params)
    new_leaves = {_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(new_state)}
    return optax.apply_updates(params, updates), new_leaves


def _sum_of_squares(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree))


def _layer_shardings(model_config: model_lib.ModelConfig, mesh):
  """One layer's slice of each stacked weight, sharded like the stack without its layer axis."""
  stacked = model_lib.param_shardings(model_config, mesh)["layers"]
  return jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(*s.spec[1:])), stacked)


def _write_in_place(stack, moments, index, new_weights, new_state, dx):
  """Writes one layer's new weights and moments into the stacked buffers, in place.

  In-place writes need every read of the old slice done first: the weights are read for the
  input's gradient too, and the weights' update reads the old moments. XLA:CPU copies every
  stacked weight and moment each layer unless that order is a data dependency, so there each
  write adds zero times (a value computed after those reads): exact, and a dependency. The TPU
  compiler orders them itself (its compiled peak drops by the whole gradient without them), and
  the scalar reads would each be a collective there.
  """
  if sharding.target_platform() != "cpu":
    stack = jax.tree.map(lambda a, w: a.at[index].set(w), stack, new_weights)
    return stack, {k: a.at[index].set(new_state[k]) for k, a in moments.items()}
  after_reads = dx.reshape(-1)[0].astype(jnp.float32) * 0.0
  stack = jax.tree.map(lambda a, w: a.at[index].set(w + after_reads.astype(w.dtype)), stack,
                       new_weights)
  after_weights = sum(a[index].reshape(-1)[0] * 0.0 for a in jax.tree.leaves(stack))
  return stack, {k: a.at[index].set(new_state[k] + after_weights.astype(a.dtype))
                 for k, a in moments.items()}


class _Pullbacks:
  """Each layer's pullback, stacked by the forward scan without the layer's weights in it.

  A pullback is a pytree of residuals; those that are the layer's weights themselves are
  recorded by position and filled in again from the stacked parameters in the backward scan.
  """

  def __init__(self):
    self.treedef = None
    self.weight_slots = None

  def split(self, pullback, weights) -> list:
    leaves, self.treedef = jax.tree.flatten(pullback)
    weight_leaves = jax.tree.leaves(weights)
    self.weight_slots = [next((j for j, w in enumerate(weight_leaves) if leaf is w), -1)
                         for leaf in leaves]
    return [leaf for leaf, slot in zip(leaves, self.weight_slots) if slot < 0]

  def join(self, saved, weights):
    weight_leaves, rest = jax.tree.leaves(weights), iter(saved)
    leaves = [weight_leaves[slot] if slot >= 0 else next(rest) for slot in self.weight_slots]
    return jax.tree.unflatten(self.treedef, leaves)


def loss_and_update(model_config: model_lib.ModelConfig, mesh, tx: optax.GradientTransformation,
                    params: Mapping, opt_state, batch: Mapping[str, jax.Array],
                    dropout_key: jax.Array | None,
                    loss_of_logits: Callable[[jax.Array], jax.Array]):
  """One fused step: (loss, gradient norm, new params, new optimizer state).

  `loss_of_logits(padded logits) -> scalar` is the step's loss; the result equals
  `tx.update` on `jax.value_and_grad` of it (the ordinary step) up to float rounding.
  """
  layers = params["layers"]
  outer = {k: v for k, v in params.items() if k != "layers"}
  bind = lambda o: model_lib.bind(model_config, {**o, "layers": layers})
  state_leaves = {_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(opt_state)}
  sliced = _SlicedOptimizer(tx)

  x, embed_pullback = jax.vjp(lambda o: bind(o).embed_tokens(batch["inputs"]), outer)
  model = bind(outer)
  layer_step = model.layer_step(batch["positions"], batch["segment_ids"])
  rates, keys, indices = model.layer_scan_inputs(dropout_key)
  pullbacks = _Pullbacks()

  def forward(x, inputs):
    weights, rate, key, index = inputs
    apply = lambda w, x: layer_step((x, None), (w, rate, key, index))[0][0]
    y, pullback = jax.vjp(apply, weights, x)
    return y, pullbacks.split(pullback, weights)

  x, saved = jax.lax.scan(forward, x, (layers, rates, keys, indices))
  loss, head_pullback = jax.vjp(lambda o, x: loss_of_logits(bind(o).output_logits(x, True)), outer, x)
  outer_grads, dx = head_pullback(jnp.ones_like(loss))
  sumsq = _sum_of_squares({k: v for k, v in outer_grads.items() if k != "embed"})
  # The head and final norm are done: update them now (the embedding also has the input's part).
  head = [k for k in outer if k != "embed"]
  new_head, new_leaves = sliced.update({k: outer_grads[k] for k in head},
                                       {k: outer[k] for k in head}, state_leaves.__getitem__)
  layer_leaves = {_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(opt_state)
                  if _is_param_leaf(p) and _under(p, "layers")}
  slice_shardings = _layer_shardings(model_config, mesh)

  def backward(carry, inputs):
    dx, stack, moments, sumsq = carry
    saved_i, index = inputs
    weights = jax.tree.map(lambda a: a[index], stack)
    grads, dx = pullbacks.join(saved_i, weights)(dx)
    grads = jax.lax.with_sharding_constraint(grads, slice_shardings)
    leaf_of = lambda k: moments[k][index] if k in moments else state_leaves[k]
    new_weights, new_state = sliced.update({"layers": grads}, {"layers": weights}, leaf_of)
    stack, moments = _write_in_place(stack, moments, index, new_weights["layers"], new_state, dx)
    return (dx, stack, moments, sumsq + _sum_of_squares(grads)), None

  (dx, new_layers, new_moments, sumsq), _ = jax.lax.scan(
      backward, (dx, layers, layer_leaves, sumsq), (saved, indices), reverse=True)
  (embed_grads,) = embed_pullback(dx)
  embed_grads = jax.tree.map(jnp.add, outer_grads["embed"], embed_grads["embed"])
  sumsq = sumsq + _sum_of_squares(embed_grads)
  new_embed, embed_leaves = sliced.update({"embed": embed_grads}, {"embed": outer["embed"]},
                                          state_leaves.__getitem__)
  new_leaves.update(embed_leaves)
  new_leaves.update(new_moments)
  new_opt_state = jax.tree_util.tree_map_with_path(lambda p, _: new_leaves[_key(p)], opt_state)
  new_params = {**new_head, **new_embed, "layers": new_layers}
  return loss, jnp.sqrt(sumsq), new_params, new_opt_state

