"""lima_jax checkpoints written and read one chunk at a time, as plain chunk files.

`save_streamed` writes the layout of `checkpoint.save_model` (an Orbax PyTree checkpoint that
Orbax, TensorStore and every lima_jax reader restore) from `StreamedArray` leaves, whose chunks
are produced on demand, so a conversion holds a few chunks, not the model. Each array is zarr3
without OCDBT, compression or sharding: a `zarr.json` (written by TensorStore) and one file per
chunk holding its raw little-endian bytes, in any axis order (zarr3's `transpose` codec). A
converter stores the bytes in the source's order, so a chunk file is a byte-for-byte piece of a
safetensors file: both directions copy those pieces file to file in the kernel
(`paths.copy_range`) without reading them, while every reader still sees the array in lima_jax's
layout. `open_params` opens each stored parameter as a lazy TensorStore; `chunk_files` says
where the bytes of one stored that way lie.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import logging
import math
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from lima_jax import checkpoint
from lima_jax import libc
from lima_jax import paths


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
  """A checkpoint leaf written chunk by chunk: `read(index)` gives the block at `index`.

  Chunks tile the array with `chunk_shape` (also the stored chunk shape), so the writer holds
  one chunk at a time however large the array is. Where a block's bytes already lie in a file,
  `byte_range(index)` names them (the block in `storage_order`, C-contiguous, followed by
  zeros to its end) and they are copied unread; it returns None for blocks `read` must make.
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  read: Callable[[tuple[slice, ...]], np.ndarray]
  # The array's axes in the order the chunk bytes are stored (None: C order); `read` may
  # return a transposed view, which is then written with a plain copy.
  storage_order: tuple[int, ...] | None = None
  byte_range: Callable[[tuple[slice, ...]], paths.FileRange | None] | None = None

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def order(self) -> tuple[int, ...]:
    return tuple(self.storage_order) if self.storage_order is not None else tuple(range(self.ndim))

  def chunks(self) -> Iterator[tuple[slice, ...]]:
    grid = [range(0, n, c) for n, c in zip(self.shape, self.chunk_shape)]
    for starts in np.ndindex(*[len(g) for g in grid]):
      yield tuple(slice(g[i], min(g[i] + c, n))
                  for g, i, c, n in zip(grid, starts, self.chunk_shape, self.shape))


# Chunk files written at once: two keep both cores busy locally (a chunk a core); remote writes
# wait on the network, so more overlap there. Memory is bounded by that many chunks.
_LOCAL_WRITERS = 2
_REMOTE_WRITERS = 8
_ZEROS = bytes(4 * 2**20)


@contextlib.contextmanager
def no_gc():
  """The cyclic garbage collector off: a conversion makes no cycles, and with JAX and Orbax
  loaded each collection walks a large heap (7% of a conversion's CPU time, measured)."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


@contextlib.contextmanager
def quiet_absl():
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _chunk_key(grid_index: Sequence[int]) -> str:
  """zarr3's default chunk key ("c/i/j/k", "/" separated; "c" for a 0-d array)."""
  return "/".join(["c"] + [str(i) for i in grid_index])


def _contiguous_split(block: Sequence[int], whole: Sequence[int]) -> int | None:
  """The axis along which a block of shape `block` may stop short of `whole` and still be one
  run of a C-ordered buffer of shape `whole` (from the start of a row of that axis): the first
  axis where the block is longer than one, when every later axis is whole; else None. A chunk's
  block is then a prefix of the chunk's bytes, and chunks are runs of the array's."""
  split = next((a for a, n in enumerate(block) if n != 1), len(block))
  return split if tuple(block[split + 1:]) == tuple(whole[split + 1:]) else None


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes a StreamedArray into the array format Orbax's NumPy/jax.Array handlers read.

  The TensorStore spec is Orbax's own (`get_json_tspec_write`, zarr3 without OCDBT) with plain
  chunk codecs (see `_write_spec`); TensorStore writes the array's `zarr.json`, and the chunk
  files, which that format defines as the raw bytes of each chunk, are written here.
  """

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    # As Orbax's own handlers do, write in a commit future: it starts once Orbax signals that
    # the item's directory exists (writing sooner races with its creation).
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        self._write(values, infos, args), name="streamed_array")]

  async def _write(self, values, infos, args):
    arrays = []
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      await ts.open(ts.Spec(_write_spec(value, info, arg)), create=True, open=True,
                    context=info.ts_context)
      arrays.append((value, paths.path(info.parent_dir) / info.name))
    try:
      await asyncio.to_thread(_write_arrays, arrays)
    finally:
      libc.release_free_memory()


def _write_arrays(arrays: Sequence[tuple[StreamedArray, epath.Path]]) -> None:
  """Every chunk file of every array, a few at a time.

  Nothing is synced here: the disk streams the whole checkpoint while the kernel is told to
  start writing each file as it is done, and the `paths.staged_directory` the checkpoint is
  written in syncs it all once, before publishing it, waiting for little.
  """
  remote = any(paths.is_remote(d) for _, d in arrays)
  jobs = [(value, directory, index) for value, directory in arrays for index in value.chunks()]
  with concurrent.futures.ThreadPoolExecutor(_REMOTE_WRITERS if remote else _LOCAL_WRITERS,
                                             thread_name_prefix="chunk-writer") as pool:
    for done in pool.map(lambda job: _write_chunk(*job), jobs):
      del done


def _write_chunk(value: StreamedArray, directory: epath.Path, index: tuple[slice, ...]) -> None:
  """One chunk file: the block at `index` in storage order, zero-padded to the chunk's shape."""
  order = value.order
  chunk = tuple(value.chunk_shape[a] for a in order)
  block_shape = tuple(index[a].stop - index[a].start for a in order)
  chunk_bytes = math.prod(chunk) * value.dtype.itemsize
  target = directory / _chunk_key([s.start // c for s, c in zip(index, value.chunk_shape)])
  target.parent.mkdir(parents=True, exist_ok=True)
  source = None
  if value.byte_range is not None and _contiguous_split(block_shape, chunk) is not None:
    source = value.byte_range(index)
  with target.open("wb") as f:
    if source is not None:
      paths.copy_range(source, f)
      written = source.nbytes
    else:
      block = np.asarray(value.read(index), value.dtype).transpose(order)
      if block_shape != chunk:
        padded = np.zeros(chunk, value.dtype)
        padded[tuple(slice(0, n) for n in block_shape)] = block
        block = padded
      block = np.ascontiguousarray(block)
      f.write(memoryview(block.reshape(-1).view(np.uint8)))
      written = block.nbytes
      del block
    for start in range(written, chunk_bytes, len(_ZEROS)):
      f.write(_ZEROS[:min(len(_ZEROS), chunk_bytes - start)])
    if not paths.is_remote(target):
      f.flush()
      libc.start_writeback(f.fileno())


_PLAIN_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}


def _write_spec(value: StreamedArray, info, arg) -> dict:
  """Orbax's zarr3 TensorStore spec for `value`, with plain chunk files in storage order.

  Uncompressed: zstd cost more CPU than the rest of a conversion (random bf16 shrank ~20%), and
  the bytes could no longer be copied unread. Orbax and TensorStore read any codecs, since the
  array's metadata names them.
  """
  if info.is_ocdbt_checkpoint:
    raise ValueError("StreamedArray writes plain chunk files: save it with use_ocdbt=False")
  if sys.byteorder != "little":
    raise ValueError("chunk files hold little-endian bytes; this host is big-endian")
  info.use_compression = False
  info.use_zarr3 = True
  spec = ocp.type_handlers.get_json_tspec_write(
      info, use_ocdbt=False, global_shape=value.shape, local_shape=value.chunk_shape,
      dtype=value.dtype, process_index=None, arg=arg)
  codecs = [dict(_PLAIN_BYTES)]
  order = value.order
  if order != tuple(range(value.ndim)):
    codecs.insert(0, {"name": "transpose", "configuration": {"order": list(order)}})
  spec["metadata"]["codecs"] = codecs
  spec["metadata"]["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/"}}
  spec["metadata"]["chunk_grid"] = {"name": "regular",
                                    "configuration": {"chunk_shape": list(value.chunk_shape)}}
  return spec


@dataclasses.dataclass(frozen=True)
class ChunkFiles:
  """A stored array whose chunks are plain files (see the module docstring): where its bytes lie.

  `order` is the axis order of the bytes in each chunk file (zarr3 `transpose`, else C order).
  """
  directory: epath.Path
  shape: tuple[int, ...]
  chunk_shape: tuple[int, ...]
  order: tuple[int, ...]
  dtype: np.dtype

  def ranges(self, start: int, stop: int) -> list[paths.FileRange] | None:
    """Elements [start, stop) of the array laid out in `order` (flattened), as pieces of chunk
    files; None where chunks do not hold that layout in runs (then read it with TensorStore),
    or a chunk file is missing or of the wrong size."""
    shape = [self.shape[a] for a in self.order]
    chunk = [self.chunk_shape[a] for a in self.order]
    split = _contiguous_split(chunk, shape)
    if split is None:
      return None
    itemsize = self.dtype.itemsize
    inner = math.prod(shape[split + 1:])
    along = shape[split] if split < len(shape) else 1
    step = chunk[split] if split < len(chunk) else 1
    chunk_bytes = math.prod(chunk) * itemsize
    out = []
    while start < stop:
      outer, rest = divmod(start, along * inner)
      row, within = divmod(rest, inner)
      j = row // step
      run_end = outer * along * inner + min((j + 1) * step, along) * inner
      take = min(stop, run_end) - start
      grid = [0] * len(shape)
      grid[:split] = np.unravel_index(outer, shape[:split]) if split else []
      if split < len(shape):
        grid[split] = j
      array_grid = [0] * len(shape)
      for s, a in enumerate(self.order):
        array_grid[a] = int(grid[s])
      path = self.directory / _chunk_key(array_grid)
      try:
        if path.stat().length != chunk_bytes:
          return None
      except (FileNotFoundError, OSError):
        return None
      offset = ((row - j * step) * inner + within) * itemsize
      out.append(paths.FileRange(path, offset, take * itemsize))
      start += take
    return out


def _plain_chunk_layout(meta: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """(chunk_shape, order) of a zarr3 array whose chunks are plain little-endian bytes, else None."""
  if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
    return None
  grid = meta.get("chunk_grid") or {}
  keys = meta.get("chunk_key_encoding") or {}
  if grid.get("name") != "regular" or keys.get("name") != "default" or (
      (keys.get("configuration") or {}).get("separator", "/") != "/"):
    return None
  ndim = len(meta.get("shape", []))
  codecs = list(meta.get("codecs") or [])
  order = tuple(range(ndim))
  if codecs and codecs[0].get("name") == "transpose":
    order = tuple(codecs.pop(0).get("configuration", {}).get("order", ()))
    if sorted(order) != list(range(ndim)):
      return None
  if len(codecs) != 1 or codecs[0].get("name") != "bytes" or (
      (codecs[0].get("configuration") or {}).get("endian", "little") != "little"):
    return None
  return tuple(grid.get("configuration", {}).get("chunk_shape", ())), order


def chunk_files(path, stores: Mapping[tuple[str, ...], ts.TensorStore]) -> dict[tuple[str, ...], ChunkFiles]:
  """The parameters of checkpoint `path` (opened by `open_params`) stored as plain chunk files."""
  params_dir = checkpoint.resolve(path) / checkpoint.PARAMS
  found = {}
  for keys, store in stores.items():
    directory = params_dir / ".".join(keys)
    try:
      meta = json.loads((directory / "zarr.json").read_text())
    except (OSError, ValueError):  # An OCDBT checkpoint keeps no per-array files.
      continue
    layout = _plain_chunk_layout(meta)
    if layout is not None and tuple(meta.get("shape", ())) == tuple(store.shape):
      found[keys] = ChunkFiles(directory, tuple(store.shape), layout[0], layout[1],
                               np.dtype(store.dtype.numpy_dtype))
  return found


def save_streamed(path: epath.Path, params: Mapping, model_config_json: Mapping[str, Any],
                  tokenizer_blob: Mapping[str, Any] | None = None) -> None:
  """A lima_jax checkpoint (the layout of `checkpoint.save_model`, zarr3) from StreamedArray
  leaves. Local files are not fsynced here: write into a `paths.staged_directory`, which syncs
  them before the checkpoint appears."""
  with quiet_absl():  # It warns that the handler shares the "np.ndarray" type name: intended.
    ocp.type_handlers.register_type_handler(StreamedArray, _StreamedArrayHandler(), override=True)
  items = {checkpoint.PARAMS: ocp.args.PyTreeSave(params),
           checkpoint.MODEL_CONFIG: ocp.args.JsonSave(dict(model_config_json))}
  if tokenizer_blob is not None:
    items[checkpoint.TOKENIZER] = ocp.args.JsonSave(dict(tokenizer_blob))
  handler = ocp.CompositeCheckpointHandler(
      **{checkpoint.PARAMS: ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True,
                                                         use_compression=False),
         checkpoint.MODEL_CONFIG: ocp.JsonCheckpointHandler(),
         checkpoint.TOKENIZER: ocp.JsonCheckpointHandler()})
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_no_ocdbt_merge_notice)
  try:
    with no_gc(), ocp.Checkpointer(handler) as checkpointer:
      checkpointer.save(paths.absolute(path), ocp.args.Composite(**items))
  finally:
    absl_logger.removeFilter(_no_ocdbt_merge_notice)


def _no_ocdbt_merge_notice(record: logging.LogRecord) -> bool:
  """Drops Orbax's warning that it found no OCDBT files to merge: none are written, by design."""
  return "Skipping merge of OCDBT" not in str(record.msg)


def open_params(path) -> dict[tuple[str, ...], Any]:
  """Each parameter of a lima_jax checkpoint as an open TensorStore (lazy; slice, then read)."""
  params_dir = checkpoint.resolve(path) / checkpoint.PARAMS
  with quiet_absl(), ocp.StandardCheckpointer() as ckptr:  # (no _CHECKPOINT_METADATA per item)
    meta = ckptr.metadata(params_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
  context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
  stores = {}
  for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in keypath)
    for zarr3 in (False, True):
      info = ocp.type_handlers.ParamInfo(name=".".join(keys), parent_dir=params_dir,
                                         is_ocdbt_checkpoint=use_ocdbt, use_zarr3=zarr3,
                                         ts_context=context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
      try:
        stores[keys] = ts.open(ts.Spec(spec), open=True, context=context).result()
        break
      except ValueError:
        if zarr3:
          raise
  return stores
