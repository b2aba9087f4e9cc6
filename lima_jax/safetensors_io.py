"""Reading and writing safetensors files a block of rows at a time, refusing malformed files.

The format: an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the tensors' bytes back to back
in C order. Reads here are positioned `readinto`s of just the rows asked for, and writes stream
each tensor from generators of blocks, so a 65B model converts on a host with far less memory
than the model.

Why not `safetensors.safe_open(...).get_slice` for the reads (`benchmarks/safetensors_reads.py`,
1 GiB shard, 512-row blocks): the library maps the shard, and every page a slice touches stays in
the resident set until the file is closed (one handle for the shard: +1032 MiB RSS; one per
tensor: +136 MiB, the largest tensor). Opened anew for every block it stays within one block
(+8 MiB, as positioned reads) but took 0.44 s against 0.30 s, and it needs a local file to map,
where positioned reads also work on a file object of a gs:// path. So the library is used for
what it is authoritative on, the header: `SafetensorsFile` checks every rule the library enforces
(with messages naming the file and tensor) and then has `safe_open` confirm it, before a byte of
tensor data is used.

Files are opened through lima_jax.paths, so they may live on gs:// (reads are byte ranges; a
write is one streamed object upload, visible only once complete).
"""

import dataclasses
import json
import math
import os
import queue
import struct
import threading
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from lima_jax import libc
from lima_jax import paths

# safetensors dtype names <-> NumPy. Floating types only: lima_jax never stores quantized weights.
FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
# Bits per element of every dtype the format defines (the reference library's list), so any
# valid file is read and its offsets checked, even where the converter then refuses the dtype.
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
              "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16,
              "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}
# Header fields are padded to this alignment, as the reference writer does.
_ALIGN = 8
_MAX_HEADER_BYTES = 100_000_000  # The reference library's limit.


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


def _unique_keys(pairs):
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"the header names {key!r} twice")
    out[key] = value
  return out


def _is_index(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(file_size: int, header_len: int | None, raw: bytes
                 ) -> tuple[dict[str, str], list[TensorInfo]]:
  """(metadata, tensors) of a file of `file_size` bytes whose header is `raw`, checked.

  The reference library's rules (safetensors 0.8): the header fits in the file; it is UTF-8
  JSON, an object; `__metadata__`, if any, maps strings to strings; each tensor has a known
  dtype, a shape of non-negative integers and two integer offsets with `end - begin` equal to its
  byte size; sorted by offset, the tensors tile the data area exactly, from its first byte to
  the file's last, with no gap and no overlap. Stricter in one way: a name given twice (the
  library keeps one silently) is refused.
  """
  if header_len is None:
    raise ValueError(f"the file has {file_size} bytes, fewer than the 8-byte header length")
  if header_len > _MAX_HEADER_BYTES:
    raise ValueError(f"header length {header_len} exceeds the format's limit of "
                     f"{_MAX_HEADER_BYTES} bytes")
  if 8 + header_len > file_size:
    raise ValueError(f"header length {header_len} runs past the end of the file ({file_size} "
                     f"bytes): truncated, or not a safetensors file")
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
  except UnicodeDecodeError as e:
    raise ValueError(f"the header is not UTF-8 ({e})") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"the header is not valid JSON ({e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
  metadata = header.pop("__metadata__", None)
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise ValueError("__metadata__ must map strings to strings")
  data_start, data_size = 8 + header_len, file_size - 8 - header_len
  tensors = []
  for name, entry in header.items():
    where = f"tensor {name}"
    if not isinstance(entry, dict):
      raise ValueError(f"{where}: expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
      raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
      raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
      raise ValueError(f"{where}: data_offsets {offsets!r} is not two non-negative integers")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
      raise ValueError(f"{where}: {math.prod(shape)} elements of {dtype} do not fill whole bytes")
    if end < begin or end - begin != bits // 8:
      raise ValueError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but "
                       f"shape {shape} of {dtype} needs {bits // 8}")
    tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))
  ordered = sorted(tensors, key=lambda t: (t.begin, t.end))
  for previous, t in zip(ordered, ordered[1:]):  # Overlaps first: the most telling diagnosis.
    if t.begin < previous.end:
      raise ValueError(f"tensor {t.name} (data bytes [{t.begin - data_start}, "
                       f"{t.end - data_start})) overlaps tensor {previous.name} ([{previous.begin - data_start}, "
                       f"{previous.end - data_start})); one tensor's bytes would be read as another's")
  covered = data_start
  for t in ordered:
    if t.begin > covered:
      raise ValueError(f"data bytes [{covered - data_start}, {t.begin - data_start}) before "
                       f"tensor {t.name} belong to no tensor")
    if t.end - data_start > data_size:
      raise ValueError(f"tensor {t.name} ends at data byte {t.end - data_start}, but the file "
                       f"holds {data_size} bytes of data: truncated (an interrupted download?)")
    covered = t.end
  if covered - data_start != data_size:
    raise ValueError(f"{data_size - (covered - data_start)} bytes after the last tensor belong to "
                     f"no tensor")
  return metadata, tensors


def _library_check(path: str) -> None:
  """Has the reference library (when installed) open the header too: its word is final.

  Local files only: the library opens paths itself (a gs:// object is checked by
  `parse_header` alone).
  """
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if paths.is_remote(path) or not os.path.isfile(path):
    return
  try:
    with safetensors.safe_open(os.fspath(path), framework="numpy"):
      pass
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f"the safetensors library refuses it ({e})") from e


class SafetensorsFile:
  """Random access to the tensors of one .safetensors file, without mapping it.

  Construction validates the header as the reference library does (see `parse_header`) and
  raises ValueError naming the file (and tensor) otherwise.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = paths.path(path)
    try:
      with self.path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        raw = f.read(header_len) if header_len is not None and 8 + header_len <= size else b""
    except OSError as e:
      raise ValueError(f"{self.path}: cannot read ({e})") from e
    try:
      self.metadata, tensors = parse_header(size, header_len, raw)
      _library_check(self.path)
    except ValueError as e:
      raise ValueError(f"{self.path}: not a valid safetensors file: {e}") from e
    self.tensors = {t.name: t for t in tensors}

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
  writer never needs the whole tensor at once; a block may also be a `paths.FileRange`, bytes
  that already lie in a file, copied file to file without being read.
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


def _contiguous(block, dtype) -> "np.ndarray | paths.FileRange":
  """A block as C-ordered bytes of `dtype`; a FileRange (bytes copied file to file) as it is."""
  if isinstance(block, paths.FileRange):
    return block
  return np.ascontiguousarray(block, dtype=dtype)


def _read_ahead(sources: Sequence[TensorSource], depth: int) -> Iterator[tuple[TensorSource, np.ndarray]]:
  """(source, block) for every block of every source in order, made up to `depth` blocks ahead
  on a thread (reads and transposes there overlap the file writes here)."""
  slots: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        slots.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for s in sources:
        for block in s.blocks():
          if not put(("block", s, _contiguous(block, s.dtype))):
            return
      put(("done", None, None))
    except BaseException as e:  # pylint: disable=broad-exception-caught  (re-raised below)
      put(("error", None, e))

  thread = threading.Thread(target=produce, name="safetensors-read-ahead", daemon=True)
  thread.start()
  try:
    while True:
      kind, source, item = slots.get()
      if kind == "done":
        return
      if kind == "error":
        raise item
      yield source, item
  finally:
    stop.set()
    thread.join()


def write_file(path: str | os.PathLike, sources: Sequence[TensorSource],
               metadata: Mapping[str, str] = (("format", "pt"),), read_ahead: int = 2) -> None:
  """Writes `sources` as one safetensors file, streaming each tensor's blocks to disk.

  Wider dtypes go first (stable otherwise), as the reference writer orders them, so every
  tensor starts at an offset aligned to its element size. Blocks are produced up to
  `read_ahead` ahead of the write on a thread (0: in line).
  """
  sources = sorted(sources, key=lambda s: -np.dtype(s.dtype).itemsize)
  header = _header_bytes(sources, dict(metadata))
  if read_ahead > 0:
    blocks = _read_ahead(sources, read_ahead)
  else:
    blocks = ((s, _contiguous(b, s.dtype)) for s in sources for b in s.blocks())
  written = dict.fromkeys((s.name for s in sources), 0)

  def check(s: TensorSource) -> None:
    if written[s.name] != s.nbytes:
      raise ValueError(f"{path}: tensor {s.name} produced {written[s.name]} bytes, expected {s.nbytes}")

  local = not paths.is_remote(path)
  with paths.path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    done = 0  # Sources before this index are complete.
    for s, block in blocks:
      while sources[done] is not s:
        check(sources[done])
        done += 1
      if isinstance(block, paths.FileRange):
        paths.copy_range(block, f)
      else:
        f.write(memoryview(block.reshape(-1).view(np.uint8)))
      written[s.name] += block.nbytes
      if local:  # The disk writes what is done while the rest is made; the caller syncs.
        f.flush()
        libc.start_writeback(f.fileno())
    for s in sources[done:]:
      check(s)


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
