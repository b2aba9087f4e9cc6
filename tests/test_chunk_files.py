"""Chunk files copied unread: the byte ranges a converter copies file to file are the right bytes."""

import io

import numpy as np
import pytest
import tensorstore as ts

from lima_jax import checkpoint
from lima_jax import paths
from lima_jax.convert import orbax_stream
from lima_jax.convert import param_names


def _save(tmp_path, array, chunk_shape, order, byte_range=None):
  """`array` saved by save_streamed with its chunk bytes in axis order `order`."""
  leaf = orbax_stream.StreamedArray(array.shape, array.dtype, chunk_shape,
                                    lambda index: array[index], order, byte_range)
  orbax_stream.save_streamed(tmp_path / "ckpt", {"w": leaf}, {"name": "test"})
  stores = orbax_stream.open_params(tmp_path / "ckpt")
  return stores, orbax_stream.chunk_files(tmp_path / "ckpt", stores)


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1)])
def test_ranges_give_the_array_bytes_in_storage_order(tmp_path, order):
  """Any run of elements, in the stored axis order, comes back from the chunk files byte for
  byte, across chunks, layers and the zero padding of a partial last chunk."""
  rng = np.random.default_rng(0)
  array = rng.standard_normal((3, 10, 4)).astype(np.float16)  # Chunks split axis 1: 4 + 4 + 2.
  chunk_shape = (1, 4, 4) if order == (0, 1, 2) else (1, 10, 3)  # Split axis 2 (stored 2nd).
  stores, files = _save(tmp_path, array, chunk_shape, order)
  np.testing.assert_array_equal(stores[("w",)].read().result(), array)
  chunks = files[("w",)]
  assert chunks.order == order and chunks.chunk_shape == chunk_shape
  flat = np.ascontiguousarray(array.transpose(order)).reshape(-1)
  for start, stop in [(0, flat.size), (0, 1), (7, 33), (39, 41), (40, 80), (119, 120)]:
    ranges = chunks.ranges(start, stop)
    got = b"".join(_read(r) for r in ranges)
    assert got == flat[start:stop].tobytes(), (start, stop)


def test_ranges_refuse_layouts_they_cannot_serve(tmp_path):
  """A chunking that does not keep the stored order in runs, or a missing chunk file, gives
  None (the exporter then reads through TensorStore)."""
  array = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
  _, files = _save(tmp_path, array, (2, 3, 4), None)  # Several layers in one chunk, split below.
  assert files[("w",)].ranges(0, array.size) is None
  _, files = _save(tmp_path / "b", array, (1, 6, 4), None)
  assert files[("w",)].ranges(0, array.size) is not None
  (tmp_path / "b" / "ckpt" / checkpoint.PARAMS / "w" / "c" / "1" / "0" / "0").unlink()
  assert files[("w",)].ranges(0, 24) is not None and files[("w",)].ranges(0, 48) is None


def test_written_from_file_ranges_with_zero_tail(tmp_path):
  """Chunks whose bytes `byte_range` names are copied from that file, the rest of each chunk
  zeros; chunks it declines are made by `read`."""
  rng = np.random.default_rng(1)
  array = rng.standard_normal((10, 4)).astype(np.float32)
  array[8:] = 0  # Rows 8-9 are "padding" the source file does not hold.
  source = tmp_path / "source.bin"
  source.write_bytes(b"HEADER" + array[:8].tobytes())
  used = []

  def byte_range(index):
    start, stop = index[0].start, index[0].stop
    if start == 4:  # The middle chunk: declined, so it is read.
      return None
    used.append(start)
    real = max(0, min(stop, 8) - start)
    return paths.FileRange(paths.path(source), 6 + start * 16, real * 16)

  stores, _ = _save(tmp_path, array, (4, 4), None, byte_range)
  np.testing.assert_array_equal(stores[("w",)].read().result(), array)
  assert used == [0, 8]


def test_copy_range_through_a_buffer_matches_the_kernel_copy(tmp_path):
  data = np.random.default_rng(2).integers(0, 256, 3 * 2**20 + 5, dtype=np.uint8).tobytes()
  (tmp_path / "src").write_bytes(data)
  source = paths.FileRange(paths.path(tmp_path / "src"), 1000, 2**20 + 3)
  with open(tmp_path / "dst", "wb") as f:  # A local file: copy_file_range / sendfile.
    f.write(b"ab")
    paths.copy_range(source, f)
    f.write(b"cd")
  buffer = io.BytesIO()  # No file descriptor (as a gs:// object): through user space.
  buffer.write(b"ab")
  paths.copy_range(source, buffer)
  buffer.write(b"cd")
  expected = b"ab" + data[1000:1000 + 2**20 + 3] + b"cd"
  assert (tmp_path / "dst").read_bytes() == expected == buffer.getvalue()
  past_end = paths.FileRange(paths.path(tmp_path / "src"), len(data) - 10, 20)
  for out in (open(tmp_path / "dst2", "wb"), io.BytesIO()):
    with out, pytest.raises(ValueError, match="src: ends before byte"):
      paths.copy_range(past_end, out)


def test_block_rows_names_only_whole_consecutive_rows():
  q = param_names.ParamMap(("q",), "q", 2, (4, 8), (16,), True, 32)  # Layer [16, 4, 8].
  assert q.block_rows((slice(None),) * 3) == (0, 32)
  assert q.block_rows((slice(None), slice(1, 3), slice(None))) == (8, 24)
  assert q.block_rows((slice(None), slice(1, 3), slice(0, 4))) is None  # Rows with gaps.
  assert q.block_rows((slice(0, 8), slice(None), slice(None))) is None  # Half the columns.
  embed = param_names.ParamMap(("e",), "e", 0, (256,), (16,), False, 200)
  assert embed.block_rows((slice(128, 256), slice(None))) == (128, 256)


def _read(r: paths.FileRange) -> bytes:
  with r.path.open("rb") as f:
    f.seek(r.offset)
    return f.read(r.nbytes)


def test_chunk_files_ignore_an_ocdbt_checkpoint(tmp_path):
  """A checkpoint that `checkpoint.save_model` wrote (OCDBT) has no plain chunk files."""
  import jax  # pylint: disable=g-import-not-at-top
  from lima_jax import model  # pylint: disable=g-import-not-at-top
  config = model.ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32,
                             max_seq_len=16)
  params = model.init_params(config, jax.random.key(0))
  checkpoint.save_model(tmp_path / "plain", params, config)
  stores = orbax_stream.open_params(tmp_path / "plain")
  assert isinstance(next(iter(stores.values())), ts.TensorStore)
  assert orbax_stream.chunk_files(tmp_path / "plain", stores) == {}
