"""One path layer for every user path: local files and `gs://` (or anything etils.epath opens).

`pathlib` turns `gs://B/x` into `gs:/B/x` and `open`/`os.path` know only local files, so every
user-facing path (data, tokenizer, weights, workdir, tool inputs and outputs) goes through `path`,
and every write that must never be seen half-done through `write_bytes_atomic` or
`staged_directory`. What "atomic" means differs by store and is said where it matters:

* local: a temporary file in the same directory, fsync'ed, then renamed over the target;
* GCS: an object upload is atomic already (readers see the old object or the new one, never a
  part), but nothing can be renamed or appended, so directories are made "complete" by writing
  the file their readers require last (see `staged_directory`).

gcsfs caches directory listings per process; a listing made before another process wrote into a
directory (a checkpoint save, a resumed run) would look stale, so that cache is off for gs://.
"""

import contextlib
import dataclasses
import errno
import functools
import glob as glob_lib
import importlib.util
import os
import shutil
import tempfile
import uuid
from typing import BinaryIO, Iterator

import fsspec
from etils import epath

PathLike = str | os.PathLike

# Fresh listings for gs://: checkpoint discovery on resume must see what other processes wrote.
# (fsspec applies it to gcsfs instances it creates later: at the first gs:// access.)
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(p: PathLike) -> bool:
  """True for a URI with a scheme (gs://, s3://, ...): no local rename, fsync or append there."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path (local paths get `~` expanded; URIs are kept as written)."""
  text = os.fspath(p)
  if text.startswith("gs://") and not _gcsfs_installed():
    raise ImportError(f"{text}: gs:// paths need gcsfs and google-cloud-storage: pip install -r "
                      f"requirements-tpu.txt (or pip install gcsfs google-cloud-storage)")
  return epath.Path(text if is_remote(text) else os.path.expanduser(text))


@functools.cache
def _gcsfs_installed() -> bool:
  return importlib.util.find_spec("gcsfs") is not None


def absolute(p: PathLike) -> epath.Path:
  """`path(p)`, made absolute and normalized where it is local (URIs already are absolute;
  epath's own `.absolute()` would turn gs://B/x into $PWD/gs:/B/x)."""
  p = path(p)
  return p if is_remote(p) else epath.Path(os.path.abspath(p))


def expand_globs(pattern: PathLike) -> list[epath.Path]:
  """Files matching `pattern` (`*`, `?`, `[...]`, local or gs://), sorted; [] when none match.

  A pattern without magic characters is returned as is (whether or not it exists), so the
  caller's "not found" error names the path the user wrote.
  """
  text = os.fspath(pattern)
  if not glob_lib.has_magic(text):
    return [path(text)]
  if not is_remote(text):
    return [epath.Path(m) for m in sorted(glob_lib.glob(os.path.expanduser(text)))]
  scheme, rest = text.split("://", 1)
  parts = rest.split("/")
  first = next(i for i, part in enumerate(parts) if glob_lib.has_magic(part))
  if first == 0:
    raise ValueError(f"{text}: a bucket name cannot be a pattern")
  root = epath.Path(f"{scheme}://" + "/".join(parts[:first]))
  return sorted(root.glob("/".join(parts[first:])), key=os.fspath)


@dataclasses.dataclass(frozen=True)
class FileRange:
  """`nbytes` bytes of a file from `offset`: data a converter copies file to file, unread."""
  path: epath.Path
  offset: int
  nbytes: int


# Bytes a copy moves through user space at a time where the kernel cannot copy (remote files).
_COPY_BLOCK = 16 * 2**20
# Errors that mean "this kernel copy does not apply here" (other file systems, old kernels, a
# sendfile that wants a socket): the next way is tried.
_NOT_SUPPORTED = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM,
                  errno.ENOTSOCK)


def _kernel_copy(copy, in_fd: int, out_fd: int, offset: int, count: int) -> int:
  """Copies with `copy(in_fd, out_fd, offset, count)` until done; the bytes it copied (fewer
  where it does not apply here, the rest left to the caller)."""
  done = 0
  while done < count:
    try:
      n = copy(in_fd, out_fd, offset + done, count - done)
    except OSError as e:
      if e.errno in _NOT_SUPPORTED:
        return done
      raise
    if not n:
      return done
    done += n
  return done


_KERNEL_COPIES = tuple(
    fn for fn in (
        (lambda i, o, off, n: os.copy_file_range(i, o, n, off)) if hasattr(os, "copy_file_range") else None,
        (lambda i, o, off, n: os.sendfile(o, i, off, n)) if hasattr(os, "sendfile") else None)
    if fn is not None)


def copy_range(source: FileRange, out: BinaryIO) -> None:
  """Appends `source`'s bytes to the open binary file `out`.

  Between local files the kernel copies them (`copy_file_range`, else `sendfile`): no page of
  the data passes through this process, which is what makes a conversion as fast as `cp`.
  Otherwise (gs://, or where neither applies) they pass through a buffer of `_COPY_BLOCK` bytes.
  """
  out.flush()
  try:
    out_fd = None if is_remote(source.path) else out.fileno()
  except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError.
    out_fd = None
  done = 0
  if out_fd is not None:
    start = out.tell()
    in_fd = os.open(source.path, os.O_RDONLY)
    try:
      for copy in _KERNEL_COPIES:
        done += _kernel_copy(copy, in_fd, out_fd, source.offset + done, source.nbytes - done)
        if done == source.nbytes:
          break
    finally:
      os.close(in_fd)
    out.seek(start + done)  # The file object's idea of its position, after the kernel's.
  if done == source.nbytes:
    return
  with source.path.open("rb") as f:
    f.seek(source.offset + done)
    while done < source.nbytes:
      block = f.read(min(source.nbytes - done, _COPY_BLOCK))
      if not block:
        raise ValueError(f"{source.path}: ends before byte {source.offset + source.nbytes}")
      out.write(block)
      done += len(block)


def sync_tree(directory: PathLike) -> None:
  """fsync of every file and directory under a local `directory` (and itself): all it holds is
  on disk. Files that vanish meanwhile (a writer's transient lock files) are skipped."""
  for root, _, files in os.walk(directory):
    for name in files + ["."]:
      with contextlib.suppress(FileNotFoundError):
        _fsync(os.path.join(root, name))


def _current_umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def make_readable(directory: PathLike) -> None:
  """Modes of a local tree as `mkdir`/`open` give them under the umask (0755 directories, 0644
  files by default): a staged directory starts as mkdtemp's 0700 (and mkstemp's 0600 files),
  which a server running as another user could not read."""
  mask = _current_umask()
  for root, _, files in os.walk(directory):
    os.chmod(root, 0o777 & ~mask)
    for name in files:
      with contextlib.suppress(FileNotFoundError):
        os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _fsync(local_path: str) -> None:
  """fsync of one local file or directory, by path."""
  fd = os.open(local_path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_bytes_atomic(target: PathLike, data: bytes) -> None:
  """Writes `target` so that a reader sees the old content or the new, never a part of it.

  Local: a temporary file in the same directory, fsync'ed, renamed over `target`, then the
  directory fsync'ed (so the rename survives a power cut). GCS: one object upload, which is
  atomic by itself (the object is replaced only once the upload completes), so no temporary.
  """
  target = path(target)
  if is_remote(target):
    target.write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(target)) or "."
  # Not mkstemp: its 0600 mode would differ from a plainly written file's.
  tmp = os.path.join(directory, f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "xb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync(directory)


def write_text_atomic(target: PathLike, text: str) -> None:
  """`write_bytes_atomic` of UTF-8 text."""
  write_bytes_atomic(target, text.encode("utf-8"))


@contextlib.contextmanager
def staged_directory(destination: PathLike, *, fresh: bool = False,
                     complete_when: str | None = None) -> Iterator[epath.Path]:
  """Yields the directory a writer fills; `destination` counts as finished only on success.

  Local: the writer fills a temporary directory next to `destination`, synced to disk and then
  renamed to it on success (with `fresh`, the yielded path does not exist yet, for writers like
  Orbax that create it), so a crash never leaves a `destination`, whole or in part. GCS has no
  rename: the writer fills `destination` in place and must write the file its readers require
  last (`complete_when`: Orbax's commit_success.txt, a Hugging Face directory's config.json); a
  crash leaves a prefix without that file, which readers reject and a rerun reports. On an
  exception, what was written is removed (both stores), as are local parent directories this
  created.
  """
  dest = absolute(destination)
  if dest.exists():
    hint = ""
    if complete_when and is_remote(dest) and not (dest / complete_when).exists():
      hint = f" (without {complete_when}: an unfinished write; delete it to start over)"
    raise FileExistsError(f"{dest} already exists{hint}; choose a new output directory")
  if is_remote(dest):
    try:
      if not fresh:
        dest.mkdir(parents=True, exist_ok=True)
      yield dest
    except BaseException:
      with contextlib.suppress(Exception):
        if dest.exists():
          dest.rmtree()
      raise
    return
  created = []
  parent = dest.parent
  while not parent.exists():
    created.append(parent)
    parent = parent.parent
  for d in reversed(created):
    d.mkdir()
  tmp = epath.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
  inner = tmp / f"staged-{uuid.uuid4().hex[:8]}" if fresh else tmp
  try:
    yield inner
    make_readable(inner)
    sync_tree(inner)  # What the rename publishes is on disk: a crash cannot leave it half-written.
    os.rename(inner, dest)
    if fresh:
      shutil.rmtree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    for d in created:
      with contextlib.suppress(OSError):
        d.rmdir()
    raise
