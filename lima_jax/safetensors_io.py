"""Reading and writing safetensors files a block of rows at a time.

`safetensors.safe_open` maps a whole shard into memory (its touched pages count towards the
process's resident set until the file is closed) and its NumPy path cannot return bfloat16. The
format is simple enough to read and write directly: an 8-byte little-endian header length, a
JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the tensors' bytes back to back in C order. Reading with `readinto` at an offset touches only
the rows asked for, and writing tensor by tensor from generators of blocks never holds a whole
shard, which is what lets a 65B model convert on a host with far less memory than the model.
Files are opened through lima_jax.paths, so they may live on gs:// (reads are byte ranges; a
write is one streamed object upload, visible only once complete).
"""

import dataclasses
import json
import os
import struct
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from lima_jax import paths

# safetensors dtype names <-> NumPy. Floating types only: lima_jax never stores quantized weights.
FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
# Header fields are padded to this alignment, as the reference writer does.
_ALIGN = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor sits in its file; `dtype` is the safetensors name (F32, BF16, I8, ...)."""
  name: str
  dtype: str
  shape: tuple[int, ...]
  begin: int  # Absolute byte offset in the file.
  end: int

  @property
  def numpy_dtype(self) -> np.dtype | None:
    return FLOAT_DTYPES.get(self.dtype)


class SafetensorsFile:
  """Random access to the tensors of one .safetensors file, without mapping it."""

  def __init__(self, path: str | os.PathLike):
    self.path = paths.path(path)
    try:
      with self.path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
          raise ValueError("file is shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES:
          raise ValueError(f"header length {header_len} is implausible")
        header = json.loads(f.read(header_len))
        size = f.seek(0, os.SEEK_END)
    except (OSError, ValueError) as e:
      raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from e
    self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    self.tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
      begin, end = entry["data_offsets"]
      info = TensorInfo(name, entry["dtype"], tuple(int(d) for d in entry["shape"]),
                        data_start + begin, data_start + end)
      if info.end > size:
        raise ValueError(f"{self.path}: tensor {name} ends at byte {info.end} but the file has "
                         f"{size} bytes (truncated download?)")
      self.tensors[name] = info

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of tensor `name` along its first axis (the whole of a 1-D slice)."""
    info = self.tensors[name]
    dtype = info.numpy_dtype
    if dtype is None:
      raise ValueError(f"{self.path}: tensor {name} has dtype {info.dtype}; only "
                       f"{', '.join(FLOAT_DTYPES)} are supported")
    row_elems = int(np.prod(info.shape[1:], dtype=np.int64)) if info.shape else 1
    out = np.empty((stop - start,) + info.shape[1:], dtype)
    offset = info.begin + start * row_elems * dtype.itemsize
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    with self.path.open("rb") as f:
      f.seek(offset)
      got = 0
      while got < len(buffer):
        n = f.readinto(buffer[got:])
        if not n:
          raise ValueError(f"{self.path}: unexpected end of file reading tensor {name}")
        got += n
    return out

  def read(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    if not info.shape:
      return self.read_rows(name, 0, 1).reshape(())
    return self.read_rows(name, 0, info.shape[0])


@dataclasses.dataclass(frozen=True)
class TensorSource:
  """A tensor to write: its name, dtype, shape, and a callable yielding its bytes in C order.

  `blocks()` yields arrays whose concatenated bytes form the tensor (e.g. row blocks), so the
  writer never needs the whole tensor at once.
  """
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  blocks: Callable[[], Iterable[np.ndarray]]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _header_bytes(sources: Sequence[TensorSource], metadata: Mapping[str, str]) -> bytes:
  header: dict = {"__metadata__": dict(metadata)}
  offset = 0
  for s in sources:
    header[s.name] = {"dtype": DTYPE_NAMES[np.dtype(s.dtype)], "shape": list(s.shape),
                      "data_offsets": [offset, offset + s.nbytes]}
    offset += s.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  return raw + b" " * (-len(raw) % _ALIGN)


def write_file(path: str | os.PathLike, sources: Sequence[TensorSource],
               metadata: Mapping[str, str] = (("format", "pt"),)) -> None:
  """Writes `sources` as one safetensors file, streaming each tensor's blocks to disk.

  Wider dtypes go first (stable otherwise), as the reference writer orders them, so every
  tensor starts at an offset aligned to its element size.
  """
  sources = sorted(sources, key=lambda s: -np.dtype(s.dtype).itemsize)
  header = _header_bytes(sources, dict(metadata))
  with paths.path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for s in sources:
      written = 0
      for block in s.blocks():
        block = np.ascontiguousarray(block, dtype=s.dtype)
        f.write(memoryview(block.reshape(-1).view(np.uint8)))
        written += block.nbytes
      if written != s.nbytes:
        raise ValueError(f"{path}: tensor {s.name} produced {written} bytes, expected {s.nbytes}")


def plan_shards(sources: Sequence[TensorSource], max_shard_bytes: int) -> list[list[TensorSource]]:
  """Groups tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor alone)."""
  shards: list[list[TensorSource]] = [[]]
  size = 0
  for s in sources:
    if shards[-1] and size + s.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += s.nbytes
  return shards


def shard_names(num_shards: int) -> list[str]:
  """Hugging Face's file names: model.safetensors, or model-0000i-of-0000n.safetensors."""
  if num_shards == 1:
    return ["model.safetensors"]
  return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a byte count -> bytes (decimal units as transformers uses)."""
  units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
  t = str(text).strip().upper()
  number = t.rstrip("KMGTIB")
  unit = t[len(number):]
  try:
    value = float(number)
  except ValueError:
    value = -1.0
  if unit not in units or value <= 0:
    raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
  return int(value * units[unit])


def iter_row_blocks(rows: int, row_bytes: int, block_bytes: int = 64 * 2**20) -> Iterator[tuple[int, int]]:
  """(start, stop) row ranges of about `block_bytes` each, covering [0, rows)."""
  step = max(1, block_bytes // max(1, row_bytes))
  for start in range(0, rows, step):
    yield start, min(rows, start + step)
