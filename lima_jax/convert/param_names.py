"""The map between one lima_jax parameter and its Hugging Face tensors (names, shapes, axis
order), the same for reading, writing and loading; and the dtype cast that refuses overflow.

The two layouts hold the same numbers in different shapes (see lima_jax.model for ours):

  model.embed_tokens.weight                  [V, D]      embed/embedding        [Vpad, D]
  model.layers.{i}.input_layernorm.weight    [D]         layers/attn_norm/scale [L, D]
  model.layers.{i}.self_attn.q_proj.weight   [H*Dh, D]   layers/attn/q_proj     [L, D, H, Dh]
  model.layers.{i}.self_attn.{k,v}_proj.weight [KV*Dh, D] layers/attn/{k,v}_proj [L, D, KV, Dh]
  model.layers.{i}.self_attn.o_proj.weight   [D, H*Dh]   layers/attn/o_proj     [L, H, Dh, D]
  model.layers.{i}.post_attention_layernorm.weight [D]   layers/mlp_norm/scale  [L, D]
  model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]      layers/mlp/{gate,up}_proj [L, D, F]
  model.layers.{i}.mlp.down_proj.weight      [D, F]      layers/mlp/down_proj   [L, F, D]
  model.norm.weight                          [D]         final_norm/scale       [D]
  lm_head.weight                             [V, D]      lm_head                [D, Vpad]
  model.layers.{i}.self_attn.q_proj.bias     [H*Dh]      layers/attn/q_bias     [L, H, Dh]  (Qwen2)
  model.layers.{i}.self_attn.{k,v}_proj.bias [KV*Dh]     layers/attn/{k,v}_bias [L, KV, Dh]
  model.layers.{i}.self_attn.{q,k}_norm.weight [Dh]      layers/attn/{q,k}_norm/scale [L, Dh] (Qwen3)

Every map is a transpose and a reshape (PyTorch's Linear stores [out, in]); Hugging Face already
keeps q/k in the half-split rotary layout the model uses, so no permutation is needed and the
round trip is bit-exact. Rows Vpad > V are zeros (their logits are masked anyway).
"""

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from lima_jax.model import ModelConfig
from lima_jax.convert.hf_config import ConversionError


@dataclasses.dataclass(frozen=True)
class ParamMap:
  """How one lima_jax parameter is made from Hugging Face tensors, and back.

  A layer's lima_jax array has the dimensions `col_shape + row_shape` when `transpose` (else
  `row_shape + col_shape`); the Hugging Face tensor is 2-D [prod(rows), prod(cols)] (1-D for
  norms). `hf_rows` < prod(row_shape) only for the vocabulary, whose padded rows are zeros.
  """
  path: tuple[str, ...]
  hf_name: str  # With "{i}" for the layer index when stacked.
  layers: int  # 0 = not stacked.
  row_shape: tuple[int, ...]
  col_shape: tuple[int, ...]
  transpose: bool
  hf_rows: int

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return self.col_shape + self.row_shape if self.transpose else self.row_shape + self.col_shape

  @property
  def shape(self) -> tuple[int, ...]:
    return ((self.layers,) if self.layers else ()) + self.layer_shape

  @property
  def storage_order(self) -> tuple[int, ...]:
    """The permutation of `layer_shape`'s axes that is the Hugging Face order (rows, then
    columns): chunks are stored in it, so neither direction transposes bytes."""
    n_rows, n_cols = len(self.row_shape), len(self.col_shape)
    if not self.transpose:
      return tuple(range(n_rows + n_cols))
    return tuple(range(n_cols, n_cols + n_rows)) + tuple(range(n_cols))

  @property
  def array_storage_order(self) -> tuple[int, ...]:
    """`storage_order` over the whole array (the layer axis, if stacked, first)."""
    if not self.layers:
      return self.storage_order
    return (0,) + tuple(1 + a for a in self.storage_order)

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return (self.hf_rows,) + ((math.prod(self.col_shape),) if self.col_shape else ())

  @property
  def is_vocab(self) -> bool:
    return self.hf_rows != math.prod(self.row_shape)

  def hf_names(self) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(self.layers)] if self.layers else [self.hf_name]

  def _row_and_col_index(self, index: Sequence[slice]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """A block's slices over `layer_shape` split into those over the rows and the columns."""
    index = tuple(index) + (slice(None),) * (len(self.layer_shape) - len(index))
    n_cols = len(self.col_shape)
    if self.transpose:
      return index[n_cols:], index[:n_cols]
    return index[:len(self.row_shape)], index[len(self.row_shape):]

  def read(self, read_rows: Callable[[int, int], np.ndarray], index: Sequence[slice],
           dtype: np.dtype, fill: "RowFill | None" = None, name: str = "") -> np.ndarray:
    """Block `index` (slices over `layer_shape`) of one layer, reading only the rows it needs.

    `read_rows(start, stop)` returns rows of the Hugging Face tensor. Rows past `hf_rows` are
    zeros, or `fill`'s vector where it covers them (a grown vocabulary). The result has
    lima_jax's axes but may be a transposed view of the rows read (bytes in `storage_order`):
    copying it is the only relayout, done by whoever stores it.
    """
    row_index, col_index = self._row_and_col_index(index)
    row_sel = [np.arange(n)[s] for n, s in zip(self.row_shape, row_index)]
    col_sel = [np.arange(n)[s] for n, s in zip(self.col_shape, col_index)]
    rows = np.ravel_multi_index(np.ix_(*row_sel), self.row_shape).reshape(-1)
    cols = np.ravel_multi_index(np.ix_(*col_sel), self.col_shape).reshape(-1) if col_sel else None
    real = rows < self.hf_rows
    block = None
    if real.any():
      wanted = rows[real]
      start, stop = int(wanted.min()), int(wanted.max()) + 1
      block = read_rows(start, stop)
      if not (wanted.size == stop - start and np.array_equal(wanted, np.arange(start, stop))):
        block = block[wanted - start]
      if cols is not None and not np.array_equal(cols, np.arange(block.shape[1])):
        block = block[:, cols]
      block = cast(block, dtype, name)
    if block is not None and real.all() and fill is None:
      out = block  # The common case: no padding rows, no copy.
    else:
      out = np.zeros((rows.size,) + (() if cols is None else (cols.size,)), dtype)
      if block is not None:
        out[real] = block
    del block
    if fill is not None:
      grown = (rows >= fill.start) & (rows < fill.stop)
      vector = fill.vector if cols is None else fill.vector[cols]
      out[grown] = cast(vector, dtype, name)
    sel_rows = tuple(s.size for s in row_sel)
    sel_cols = tuple(s.size for s in col_sel)
    block = out.reshape(sel_rows + sel_cols)
    if self.transpose:  # A view: the writer copies it into a chunk stored in this order.
      return block.transpose(np.argsort(self.storage_order))
    return block

  def block_rows(self, index: Sequence[slice]) -> tuple[int, int] | None:
    """The rows [start, stop) (of `row_shape`, raveled) that block `index` of one layer is, when
    it is whole rows: every column, and rows that follow one another. Then its bytes in
    `storage_order` are those rows' bytes in the Hugging Face tensor. Else None."""
    row_index, col_index = self._row_and_col_index(index)
    if any(len(range(n)[s]) != n for n, s in zip(self.col_shape, col_index)):
      return None
    row_sel = [np.arange(n)[s] for n, s in zip(self.row_shape, row_index)]
    rows = np.ravel_multi_index(np.ix_(*row_sel), self.row_shape).reshape(-1)
    if not rows.size or not np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
      return None
    return int(rows[0]), int(rows[0]) + rows.size

  def to_hf(self, layer: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The Hugging Face tensor (or its rows [start, stop)) from a lima_jax array.

    `layer` is one whole layer, or, with `rows`, the block that `lima_index_of_rows` names.
    """
    start, stop = rows or (0, self.hf_rows)
    n_rows = stop - start if rows else math.prod(self.row_shape)
    n_cols = math.prod(self.col_shape)
    if not self.col_shape:
      return np.ascontiguousarray(layer.reshape(n_rows)[:stop - start])
    if self.transpose:
      return transpose_2d(layer.reshape(n_cols, n_rows)[:, :stop - start])
    return np.ascontiguousarray(layer.reshape(n_rows, n_cols)[:stop - start])

  def lima_index_of_rows(self, start: int, stop: int) -> tuple[slice, ...]:
    """The lima_jax block holding Hugging Face rows [start, stop) (one-row-axis maps only)."""
    if len(self.row_shape) != 1:
      raise ValueError(f"{'/'.join(self.path)}: rows span several axes")
    full = (slice(None),) * len(self.col_shape)
    return full + (slice(start, stop),) if self.transpose else (slice(start, stop),) + full


def transpose_2d(x: np.ndarray, rows_per_step: int = 16) -> np.ndarray:
  """`x.T` as a new C-ordered array, a band of rows at a time.

  NumPy's one-pass strided copy (`np.ascontiguousarray(x.T)`) misses the cache on nearly every
  element; copying bands of 16 source rows was about 5x faster for the 2-byte weights here
  (5632 x 2048 float16: 0.08 -> 0.4 GiB/s). Used where arrays arrive in lima_jax's layout
  (`to_hf` of merged LoRA weights); chunks that hf_to_orbax stored need no transpose.
  """
  if x.ndim != 2:
    raise ValueError(f"transpose_2d takes a matrix, got shape {x.shape}")
  rows, cols = x.shape
  out = np.empty((cols, rows), x.dtype)
  for r in range(0, rows, rows_per_step):
    out[:, r:r + rows_per_step] = x[r:r + rows_per_step].T
  return out


@dataclasses.dataclass(frozen=True)
class RowFill:
  """Rows [start, stop) of a vocabulary tensor set to `vector` (new tokens, e.g. EOT)."""
  start: int
  stop: int
  vector: np.ndarray


def param_maps(config: ModelConfig) -> dict[tuple[str, ...], ParamMap]:
  """Every parameter of `config`'s model, keyed by its path in the parameter dict."""
  d, f, l = config.d_model, config.mlp_dim, config.n_layers
  h, kv, dh = config.n_heads, config.kv_heads, config.dim_per_head
  v, vpad = config.vocab_size, config.padded_vocab_size
  layer = "model.layers.{i}."
  maps = [
      ParamMap(("embed", "embedding"), "model.embed_tokens.weight", 0, (vpad,), (d,), False, v),
      ParamMap(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", l, (d,), (), False, d),
      ParamMap(("layers", "attn", "q_proj"), layer + "self_attn.q_proj.weight", l, (h, dh), (d,), True, h * dh),
      ParamMap(("layers", "attn", "k_proj"), layer + "self_attn.k_proj.weight", l, (kv, dh), (d,), True, kv * dh),
      ParamMap(("layers", "attn", "v_proj"), layer + "self_attn.v_proj.weight", l, (kv, dh), (d,), True, kv * dh),
      ParamMap(("layers", "attn", "o_proj"), layer + "self_attn.o_proj.weight", l, (d,), (h, dh), True, d),
  ]
  if config.attention_bias:
    maps += [ParamMap(("layers", "attn", f"{n}_bias"), layer + f"self_attn.{n}_proj.bias", l,
                      (heads, dh), (), False, heads * dh)
             for n, heads in (("q", h), ("k", kv), ("v", kv))]
  if config.qk_norm:
    maps += [ParamMap(("layers", "attn", f"{n}_norm", "scale"), layer + f"self_attn.{n}_norm.weight",
                      l, (dh,), (), False, dh) for n in "qk"]
  maps += [
      ParamMap(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", l, (f,), (d,), True, f),
      ParamMap(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", l, (f,), (d,), True, f),
      ParamMap(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", l, (d,), (f,), True, d),
      ParamMap(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", l, (d,), (), False, d),
      ParamMap(("final_norm", "scale"), "model.norm.weight", 0, (d,), (), False, d),
  ]
  if not config.tie_embeddings:
    maps.append(ParamMap(("lm_head",), "lm_head.weight", 0, (vpad,), (d,), True, v))
  return {m.path: m for m in maps}


def hf_tensor_order(maps: Mapping[tuple[str, ...], ParamMap]) -> list[tuple[str, ParamMap, int]]:
  """(name, map, layer) in transformers' state-dict order: embeddings, layer by layer, head."""
  stacked = [m for m in maps.values() if m.layers]
  layers = max((m.layers for m in stacked), default=0)
  order = [(m.hf_name, m, -1) for m in maps.values() if m.path == ("embed", "embedding")]
  for i in range(layers):
    order += [(m.hf_name.format(i=i), m, i) for m in stacked]
  order += [(m.hf_name, m, -1) for m in maps.values() if not m.layers and m.path != ("embed", "embedding")]
  return order


def cast(x: np.ndarray, dtype: np.dtype, name: str = "") -> np.ndarray:
  """`x` as `dtype`, refusing values the target cannot hold (finite values that overflow)."""
  dtype = np.dtype(dtype)
  if x.dtype == dtype:
    return x
  with np.errstate(over="ignore"):
    y = x.astype(dtype)
  limit = float(ml_dtypes.finfo(dtype).max)
  if limit < float(ml_dtypes.finfo(x.dtype).max) and (np.isfinite(x) & ~np.isfinite(y)).any():
    big = float(np.abs(x[np.isfinite(x)].astype(np.float64)).max())
    raise ConversionError(f"tensor {name}: values up to {big:g} overflow {dtype.name} "
                          f"(max {limit:g}); choose a wider --dtype")
  return y


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree
