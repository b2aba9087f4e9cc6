"""LIMA's optimizer: AdamW (0.9, 0.95), weight decay 0.1 off the norm scales and biases, linear lr decay.

The paper (Zhou et al., 2023, section 3) fine-tunes with AdamW, beta1 0.9, beta2 0.95, weight
decay 0.1, and a learning rate that falls linearly from 1e-5 to 1e-6 over the whole run with no
warmup. Clipping by global norm is available (`optimizer.grad_clip_norm`) and off by default,
since the paper names none; a warmup (`optimizer.warmup_steps`) likewise.
"""

from typing import Any, Mapping

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax import model as model_lib


def learning_rate_schedule(opt_config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """lr(step): optional linear warmup from 0, then `lr` -> `end_lr` linearly.

  The decay reaches `end_lr` exactly at the run's last step (step total_steps - 1), so the
  first update uses `lr` and the last `end_lr`, as "1e-5 to 1e-6 over the run" reads.
  """
  lr, end_lr = float(opt_config["lr"]), float(opt_config["end_lr"])
  warmup = int(opt_config.get("warmup_steps", 0))
  if total_steps < 1:
    raise ValueError(f"the run has {total_steps} optimizer steps; it needs at least one "
                     "(check train.epochs, train.batch_size and the size of the training set)")
  if warmup >= total_steps:
    raise ValueError(f"optimizer.warmup_steps={warmup} is not below the run's {total_steps} steps")
  decay = optax.linear_schedule(lr, end_lr, max(total_steps - warmup - 1, 1))
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params) -> Any:
  """True where weight decay applies: every parameter except the RMSNorm scales and the q/k/v
  biases (Qwen2), as the Hugging Face Trainer leaves them."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not model_lib.is_decay_exempt(tuple(k.key for k in path)), params)


def make_optimizer(opt_config: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """The full update rule: [clip by global norm] -> AdamW with decoupled, masked weight decay."""
  adamw = optax.adamw(
      learning_rate_schedule(opt_config, total_steps),
      b1=float(opt_config["b1"]), b2=float(opt_config["b2"]), eps=float(opt_config["eps"]),
      weight_decay=float(opt_config["weight_decay"]), mask=weight_decay_mask)
  clip = float(opt_config.get("grad_clip_norm", 0.0))
  if clip > 0:
    return optax.chain(optax.clip_by_global_norm(clip), adamw)
  return adamw


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
  """Shardings for an optimizer state: each moment is split like the parameter it tracks.

  A state leaf is matched to a parameter by the dict keys at the end of its tree path and by
  shape (Adam's `mu`/`nu` are parameter-shaped trees); everything else (step counters) is
  replicated. Matching by path keeps this independent of how optax nests its states.
  """
  by_path = {}
  for path, sharding in jax.tree_util.tree_leaves_with_path(param_shardings):
    by_path[_dict_keys(path)] = sharding
  shapes = {_dict_keys(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  replicated = NamedSharding(mesh, PartitionSpec())

  def leaf_sharding(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in by_path and shapes[suffix] == leaf.shape:
        return by_path[suffix]
    return replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)
