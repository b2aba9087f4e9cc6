"""lima_jax checkpoints written and read one chunk at a time through Orbax and TensorStore.

`save_streamed` writes the layout of `checkpoint.save_model` (Orbax PyTree, OCDBT) from
`StreamedArray` leaves, whose chunks are produced on demand, so a conversion holds a few chunks,
not the model. The arrays are zarr3, uncompressed, and each chunk's bytes may be stored in any
axis order (zarr3's `transpose` codec): a converter stores them in the source's order, so that
writing and reading them back are copies, not transposes, while every reader (Orbax's restore,
TensorStore) still sees the array in lima_jax's layout. `open_params` opens each stored
parameter as a lazy TensorStore.
"""

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import gc
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from lima_jax import checkpoint
from lima_jax import paths


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
  """A checkpoint leaf written chunk by chunk: `read(index)` gives the block at `index`.

  Chunks tile the array with `chunk_shape` (also the stored chunk shape), so the writer holds
  one chunk at a time however large the array is.
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  read: Callable[[tuple[slice, ...]], np.ndarray]
  # The array's axes in the order the chunk bytes are stored (None: C order); `read` may
  # return a transposed view, which is then written with a plain copy.
  storage_order: tuple[int, ...] | None = None

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def chunks(self) -> Iterator[tuple[slice, ...]]:
    grid = [range(0, n, c) for n, c in zip(self.shape, self.chunk_shape)]
    for starts in np.ndindex(*[len(g) for g in grid]):
      yield tuple(slice(g[i], min(g[i] + c, n))
                  for g, i, c, n in zip(grid, starts, self.chunk_shape, self.shape))


def release_free_memory() -> None:
  """Hands freed heap pages back to the OS (glibc), so chunk buffers do not pile up in RSS."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _load_libc():
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim  # pylint: disable=pointless-statement
    return libc
  except (OSError, AttributeError):
    return None


_LIBC = _load_libc()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
  """Has the kernel start writing a local file's dirty pages to disk now, without waiting (Linux
  `sync_file_range`), so the final fsync waits for little. A no-op where unsupported."""
  if _LIBC is not None and hasattr(_LIBC, "sync_file_range"):
    _LIBC.sync_file_range(ctypes.c_int(fd), ctypes.c_longlong(0), ctypes.c_longlong(0),
                          ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


# Chunk writes TensorStore runs at once: a few in flight keep the disk and TensorStore busy while
# the next chunk is read (and bound memory to that many chunks).
_WRITES_IN_FLIGHT = 2
# Every this many chunks the kernel is told to start writing them out, so that the disk works
# while the CPU converts and the final sync waits for little.
_WRITEBACK_EVERY = 4


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


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes a StreamedArray into the array format Orbax's NumPy/jax.Array handlers read.

  The TensorStore spec comes from Orbax itself (`get_json_tspec_write`, zarr3, uncompressed),
  so the files are the ones Orbax would write for the array, plus a `transpose` codec where the
  chunk bytes keep the source's axis order; the data arrives chunk by chunk.
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
    jobs, contexts, local_dirs = [], {}, set()
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      # Local files are written without a sync per chunk (TensorStore's default) and synced
      # together once all are written (`_sync_tree`), before Orbax marks the save finished:
      # the disk then streams the whole checkpoint instead of waiting on every chunk.
      if id(info.ts_context) not in contexts:
        contexts[id(info.ts_context)] = ts.Context(ts.Context.Spec({"file_io_sync": False}),
                                                   info.ts_context)
      if not paths.is_remote(info.parent_dir):
        local_dirs.add(str(info.parent_dir))
      store = await ts.open(ts.Spec(_write_spec(value, info, arg)), create=True, open=True,
                            context=contexts[id(info.ts_context)])
      jobs += [(store, value, index) for index in value.chunks()]

    def read(job):  # A view in storage order, copied by the write as it stands.
      _, value, index = job
      return np.asarray(value.read(index), value.dtype)

    # A pipeline over every chunk of every array: the next chunk is read on a thread while
    # TensorStore writes up to `_WRITES_IN_FLIGHT` earlier ones (no sync per chunk: see above),
    # a few chunks in memory at once.
    ahead = asyncio.ensure_future(asyncio.to_thread(read, jobs[0])) if jobs else None
    writing: collections.deque = collections.deque()
    written = 0
    try:
      for i, (store, _, index) in enumerate(jobs):
        block = await ahead
        ahead = (asyncio.ensure_future(asyncio.to_thread(read, jobs[i + 1]))
                 if i + 1 < len(jobs) else None)
        writing.append(store[index].write(block, can_reference_source_data_indefinitely=True))
        del block
        while len(writing) >= _WRITES_IN_FLIGHT:
          await writing.popleft()
          written += 1
          if written % _WRITEBACK_EVERY == 0:
            await asyncio.to_thread(_start_writeback, local_dirs)
      while writing:
        await writing.popleft()
      for directory in sorted(local_dirs):
        await asyncio.to_thread(_sync_tree, directory)
    finally:
      if ahead is not None and not ahead.done():  # A failed write: let the read finish quietly.
        with contextlib.suppress(Exception):
          await ahead
      for pending in writing:
        with contextlib.suppress(Exception):
          await pending
      release_free_memory()


def _each_fd(directory: str, fn: Callable[[int], None], with_dirs: bool = False) -> None:
  """`fn(fd)` for every file (and directory) under `directory`; files that vanish meanwhile
  (TensorStore's transient lock files) are skipped."""
  for root, _, files in os.walk(directory):
    for name in files + (["."] if with_dirs else []):
      try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
      except FileNotFoundError:
        continue
      try:
        fn(fd)
      finally:
        os.close(fd)


def _start_writeback(directories) -> None:
  """Starts the disk writing what the chunks so far left in the page cache (see _sync_tree)."""
  for directory in directories:
    _each_fd(directory, start_writeback)


def _sync_tree(directory: str) -> None:
  """fsync of every file and directory under `directory` (and itself): what it holds is on disk."""
  _each_fd(directory, os.fsync, with_dirs=True)


def _write_spec(value: StreamedArray, info, arg) -> dict:
  """Orbax's zarr3 TensorStore spec for `value`, uncompressed, its chunks in storage order.

  Uncompressed: zstd cost more CPU than the rest of a conversion (random bf16 shrank ~20%), and
  Orbax restores either, since the array's metadata names its codecs.
  """
  use_ocdbt = bool(info.is_ocdbt_checkpoint)
  info.use_compression = False
  info.use_zarr3 = True
  spec = ocp.type_handlers.get_json_tspec_write(
      info, use_ocdbt=use_ocdbt, global_shape=value.shape, local_shape=value.chunk_shape,
      dtype=value.dtype, process_index=jax.process_index() if use_ocdbt else None, arg=arg)
  order = value.storage_order
  if order is not None and tuple(order) != tuple(range(value.ndim)):
    codecs = spec["metadata"]["codecs"]
    for codec in codecs:  # Orbax nests the chunk codecs in a one-chunk shard.
      if codec["name"] == "sharding_indexed":
        codecs = codec["configuration"]["codecs"]
    codecs.insert(0, {"name": "transpose", "configuration": {"order": list(order)}})
  return spec


def save_streamed(path: epath.Path, params: Mapping, model_config_json: Mapping[str, Any],
                  tokenizer_blob: Mapping[str, Any] | None = None) -> None:
  """A lima_jax checkpoint (the layout of `checkpoint.save_model`, zarr3) from StreamedArray
  leaves."""
  with quiet_absl():  # It warns that the handler shares the "np.ndarray" type name: intended.
    ocp.type_handlers.register_type_handler(StreamedArray, _StreamedArrayHandler(), override=True)
  items = {checkpoint.PARAMS: ocp.args.PyTreeSave(params),
           checkpoint.MODEL_CONFIG: ocp.args.JsonSave(dict(model_config_json))}
  if tokenizer_blob is not None:
    items[checkpoint.TOKENIZER] = ocp.args.JsonSave(dict(tokenizer_blob))
  handler = ocp.CompositeCheckpointHandler(
      **{checkpoint.PARAMS: ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False),
         checkpoint.MODEL_CONFIG: ocp.JsonCheckpointHandler(),
         checkpoint.TOKENIZER: ocp.JsonCheckpointHandler()})
  with no_gc(), ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(paths.absolute(path), ocp.args.Composite(**items))


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
