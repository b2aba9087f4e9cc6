"""LoRA (Hu et al., 2021): frozen base weights plus trained low-rank adapters, PEFT's way.

Each targeted projection W gains y += (alpha / rank) * (dropout(x) @ A) @ B, with A kaiming-
uniform and B zero (so step 0 computes exactly the base model), as `peft.LoraConfig` does. The
adapters live in the model's parameter tree beside the weight they adapt, one `lora` dict per
module, in the weight's own layout (the layer stack first, so they scan with their layer):

  layers/attn/lora/{q,k,v}_proj/a  [L, d_model, rank]      .../b [L, rank, heads|kv_heads, head_dim]
  layers/attn/lora/o_proj/a        [L, heads, head_dim, rank]  .../b [L, rank, d_model]
  layers/mlp/lora/{gate,up}_proj/a [L, d_model, rank]      .../b [L, rank, mlp_dim]
  layers/mlp/lora/down_proj/a      [L, mlp_dim, rank]      .../b [L, rank, d_model]

Training sees two trees: `frozen` (the base parameters, in the base dtype, no optimizer state)
and `trainable` (the adapters in float32, plus the embedding and LM-head rows of the tokens the
base lacks, i.e. EOT: `rows/embedding` [n, d_model], `rows/lm_head` [d_model, n]). `join` makes
the model's tree from the two; `merge` folds the adapters into the weights (a plain model).
"""

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# The logical axes of each projection's input and output dimensions (see lima_jax.model).
_IN_AXES = {"q_proj": ("embed",), "k_proj": ("embed",), "v_proj": ("embed",),
            "o_proj": ("heads", "head_dim"), "gate_proj": ("embed",), "up_proj": ("embed",),
            "down_proj": ("mlp",)}
_OUT_AXES = {"q_proj": ("heads", "head_dim"), "k_proj": ("kv_heads", "head_dim"),
             "v_proj": ("kv_heads", "head_dim"), "o_proj": ("embed",), "gate_proj": ("mlp",),
             "up_proj": ("mlp",), "down_proj": ("embed",)}
ADAPTER_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What a LoRA model is beyond its base: the adapters' shape and where the base comes from.

  `token_ids` are the rows of the embedding (and LM head) that train with the adapters: the
  tokens the base lacks (EOT). `base` is the base checkpoint (a Hugging Face directory or a
  lima_jax checkpoint; "" = random init from `base_seed`), so an adapter checkpoint is small.
  """
  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS
  token_ids: tuple[int, ...] = ()
  base: str = ""
  base_seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "token_ids", tuple(int(i) for i in self.token_ids))
    if self.rank < 1:
      raise ValueError(f"lora.rank={self.rank}: a LoRA model needs rank >= 1 (0 = full fine-tuning)")
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown or not self.targets:
      raise ValueError(f"lora.targets={list(self.targets)}: expected a non-empty subset of "
                       f"{', '.join(TARGETS)} (unknown: {unknown})")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout}: expected a rate in [0, 1)")

  @property
  def scale(self) -> float:
    """PEFT's scaling, alpha / rank."""
    return float(self.alpha) / self.rank

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "LoraConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(fields).items() if k in names})


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """`lora.targets` from the command line: "all", "q_proj,v_proj" or a sequence."""
  if isinstance(targets, str):
    targets = TARGETS if targets.strip() in ("", "all") else [t.strip() for t in targets.split(",")]
  return tuple(t for t in TARGETS if t in set(targets)) + tuple(
      t for t in targets if t not in TARGETS)


def enabled(model_config) -> bool:
  return getattr(model_config, "lora", None) is not None


def base_config(model_config):
  """The ModelConfig of the base model alone (no adapters)."""
  return model_config.replace(lora=None) if enabled(model_config) else model_config


# -- Adapters inside the model. -----------------------------------------------------------------


def _shapes(model_config, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  c = model_config
  dims = {"embed": c.d_model, "heads": c.n_heads, "kv_heads": c.kv_heads,
          "head_dim": c.dim_per_head, "mlp": c.mlp_dim}
  return (tuple(dims[a] for a in _IN_AXES[target]), tuple(dims[a] for a in _OUT_AXES[target]))


def make_adapters(model_config, module: str, stack: tuple[int, ...]) -> nnx.Dict | None:
  """The `lora` dict of one module ("attn" or "mlp"), zeros (`init_adapters` draws A)."""
  if not enabled(model_config):
    return None
  lc = model_config.lora
  adapters = {}
  for target in lc.targets:
    if MODULE_OF[target] != module:
      continue
    in_shape, out_shape = _shapes(model_config, target)
    adapters[target] = nnx.Dict(
        a=nnx.Param(jnp.zeros(stack + in_shape + (lc.rank,), ADAPTER_DTYPE)),
        b=nnx.Param(jnp.zeros(stack + (lc.rank,) + out_shape, ADAPTER_DTYPE)))
  return nnx.Dict(adapters) if adapters else None


def delta(model_config, adapters, target: str, x: jax.Array, key: jax.Array | None) -> jax.Array | None:
  """scale * (dropout(x) @ A) @ B for `target`, or None where it has no adapter.

  x carries the projection's input dimensions last (d_model, or heads x head_dim for o_proj).
  """
  if adapters is None or target not in adapters:
    return None
  lc = model_config.lora
  a = adapters[target]["a"][...].astype(x.dtype)
  b = adapters[target]["b"][...].astype(x.dtype)
  if key is not None and lc.dropout > 0:
    keep = jax.random.bernoulli(jax.random.fold_in(key, TARGETS.index(target)), 1.0 - lc.dropout,
                                x.shape)
    x = jnp.where(keep, x / jnp.asarray(1.0 - lc.dropout, x.dtype), jnp.zeros_like(x))
  low = jnp.tensordot(x, a, axes=a.ndim - 1)
  return (jnp.tensordot(low, b, axes=1) * jnp.asarray(lc.scale, x.dtype)).astype(x.dtype)


def dropout_key(model_config, key: jax.Array | None) -> jax.Array | None:
  """The adapters' dropout key of a layer, from its residual-dropout key (whose own masks stay
  as they were); None when adapter dropout is off."""
  if key is None or not enabled(model_config) or model_config.lora.dropout <= 0:
    return None
  return jax.random.fold_in(key, 1 << 20)


def logical_axes(path: tuple[str, ...]) -> tuple[str | None, ...] | None:
  """Logical axes of an adapter parameter (path .../lora/<target>/{a,b}); None otherwise.

  A is split like the weight's input dimensions and B like its output; the rank dimension is
  small and never split ("lora_rank" maps to no mesh axis).
  """
  if len(path) < 3 or path[-3] != "lora" or path[-2] not in TARGETS:
    return None
  target = path[-2]
  if path[-1] == "a":
    return ("layers",) + _IN_AXES[target] + ("lora_rank",)
  return ("layers", "lora_rank") + _OUT_AXES[target]


ROW_LOGICAL_AXES = {"embedding": (None, "embed"), "lm_head": ("embed", None)}


def trainable_logical_axes(trainable: Mapping) -> dict:
  """Logical axes of the trainable tree: the adapters' (`logical_axes`) and the rows'."""
  def axes(path, _):
    key = tuple(p.key for p in path)
    if key[0] == "rows":
      return ROW_LOGICAL_AXES[key[1]]
    return logical_axes(key)
  return jax.tree_util.tree_map_with_path(axes, trainable)


def init_adapters(model_config, key: jax.Array) -> dict:
  """The adapters as PEFT initialises them: A ~ kaiming-uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)),
  B = 0. A tree like `adapters(params)`."""
  lc = model_config.lora
  out: dict = {}
  stack = (model_config.n_layers,)
  for target in lc.targets:
    in_shape, out_shape = _shapes(model_config, target)
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(jax.random.fold_in(key, TARGETS.index(target)),
                           stack + in_shape + (lc.rank,), ADAPTER_DTYPE, -bound, bound)
    b = jnp.zeros(stack + (lc.rank,) + out_shape, ADAPTER_DTYPE)
    out.setdefault("layers", {}).setdefault(MODULE_OF[target], {}).setdefault("lora", {})[target] = {
        "a": a, "b": b}
  return out


# -- The two trees of training: frozen base, trainable adapters + rows. -------------------------


def adapters(params: Mapping) -> dict:
  """The adapter subtrees of a model's parameters, {"layers": {module: {"lora": ...}}}."""
  out: dict = {}
  for module, sub in params["layers"].items():
    if isinstance(sub, Mapping) and "lora" in sub:
      out.setdefault("layers", {})[module] = {"lora": sub["lora"]}
  return out


def strip_adapters(params: Mapping) -> dict:
  """The parameters without their adapters (the base model's tree)."""
  layers = {m: ({k: v for k, v in sub.items() if k != "lora"} if isinstance(sub, Mapping) else sub)
            for m, sub in params["layers"].items()}
  return {**params, "layers": layers}


def _ids(model_config) -> jax.Array:
  return jnp.asarray(model_config.lora.token_ids, jnp.int32)


def rows_of(model_config, params: Mapping) -> dict:
  """The trained rows of the embedding and (untied) LM head, at `lora.token_ids`."""
  if not model_config.lora.token_ids:
    return {}
  ids = _ids(model_config)
  rows = {"embedding": jnp.take(params["embed"]["embedding"], ids, axis=0).astype(ADAPTER_DTYPE)}
  if "lm_head" in params:
    rows["lm_head"] = jnp.take(params["lm_head"], ids, axis=1).astype(ADAPTER_DTYPE)
  return rows


def trainable_of(model_config, params: Mapping) -> dict:
  """The trainable tree of a LoRA model's parameters: adapters + rows."""
  out = adapters(params)
  rows = rows_of(model_config, params)
  if rows:
    out["rows"] = rows
  return out


def init_trainable(model_config, base_params: Mapping, key: jax.Array) -> dict:
  """Fresh adapters plus the base's own values of the trained rows (as PEFT's trainable tokens)."""
  out = init_adapters(model_config, key)
  rows = rows_of(model_config, base_params)
  if rows:
    out["rows"] = rows
  return out


def join(model_config, frozen: Mapping, trainable: Mapping) -> dict:
  """The model's parameter tree from the frozen base and the trainable tree (pure jnp).

  The base's stored values of the trained rows are replaced; every other frozen leaf is passed
  through as is (no copy outside jit).
  """
  layers = dict(frozen["layers"])
  for module, sub in trainable.get("layers", {}).items():
    layers[module] = {**layers[module], "lora": sub["lora"]}
  out = {**frozen, "layers": layers}
  rows = trainable.get("rows")
  if rows:
    ids = _ids(model_config)
    table = frozen["embed"]["embedding"]
    out["embed"] = {**frozen["embed"],
                    "embedding": table.at[ids].set(rows["embedding"].astype(table.dtype))}
    if "lm_head" in rows:
      head = frozen["lm_head"]
      out["lm_head"] = head.at[:, ids].set(rows["lm_head"].astype(head.dtype))
  return out


def num_input_dims(target: str) -> int:
  """How many leading weight dimensions (after the layer stack) are the projection's input."""
  return len(_IN_AXES[target])


def merge_delta(model_config, target: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """scale * A @ B in the weight's layout ([..., in..., out...]); float32. NumPy arrays are
  merged on the host with NumPy, others with jnp (e.g. inside jit)."""
  xp = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp
  in_dims = len(_IN_AXES[target])
  a = a.astype(xp.float32)
  b = b.astype(xp.float32)
  batch = a.ndim - in_dims - 1  # The layer stack, if any.
  letters = "abcdefgh"
  lead, ins, outs = letters[:batch], "ijk"[:in_dims], "uvw"[:b.ndim - batch - 1]
  delta = xp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", a, b)
  return xp.asarray(model_config.lora.scale, xp.float32) * delta


def merge(model_config, params: Mapping) -> tuple[dict, Any]:
  """(merged parameters, base ModelConfig): W + scale * A @ B in W's dtype, adapters dropped.

  The rows are already in the tables of a joined tree, so the result is a plain model whose
  logits equal the LoRA model's (up to rounding W's dtype).
  """
  merged = strip_adapters(params)
  layers = {m: dict(sub) for m, sub in merged["layers"].items()}
  for module, sub in adapters(params).get("layers", {}).items():
    for target, ab in sub["lora"].items():
      w = layers[module][target]
      layers[module][target] = (w.astype(jnp.float32)
                                + merge_delta(model_config, target, ab["a"], ab["b"])).astype(w.dtype)
  return {**merged, "layers": layers}, base_config(model_config)


def from_run_config(lora_section: Mapping[str, Any] | None, *, base_vocab_size: int,
                    vocab_size: int, eot_id: int | None, base: str, base_seed: int) -> LoraConfig | None:
  """The LoraConfig of a run from `config.lora`, or None for full fine-tuning (rank 0).

  The trained rows are those the base lacks ([base_vocab_size, vocab_size)); a base that
  already has an EOT row trains that row.
  """
  if not lora_section or int(lora_section.get("rank", 0)) <= 0:
    return None
  ids = list(range(base_vocab_size, vocab_size))
  if not ids and eot_id is not None and 0 <= eot_id < vocab_size:
    ids = [int(eot_id)]
  return LoraConfig(rank=int(lora_section["rank"]), alpha=float(lora_section.get("alpha", 16.0)),
                    dropout=float(lora_section.get("dropout", 0.0)),
                    targets=parse_targets(lora_section.get("targets", "all")),
                    token_ids=tuple(ids), base=base, base_seed=int(base_seed))


def num_trainable(model_config) -> int:
  """Trainable parameters of a LoRA model: adapters + rows."""
  lc = model_config.lora
  n = 0
  for target in lc.targets:
    in_shape, out_shape = _shapes(model_config, target)
    n += model_config.n_layers * lc.rank * (math.prod(in_shape) + math.prod(out_shape))
  heads = 1 if model_config.tie_embeddings else 2
  return n + heads * len(lc.token_ids) * model_config.d_model
