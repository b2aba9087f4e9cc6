"""The few glibc/Linux calls Python's standard library lacks, in one place (each a no-op where the
C library or the call is missing): they bound a conversion's memory and let the disk work while
it runs. Imports no jax, so a command may call these before its process set-up."""

import ctypes


def _load():
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


_LIBC = _load()
_M_ARENA_MAX = -8
_SYNC_FILE_RANGE_WRITE = 2


def limit_malloc_arenas(arenas: int = 2) -> None:
  """Caps glibc's per-thread heap arenas; call it before any thread starts.

  TensorStore and XLA run many threads; each gets its own arena, and the freed buffers of
  chunk after chunk linger in them (measured: +30% peak RSS converting a 336 MB model). Two
  arenas keep the peak near one chunk's worth.
  """
  if _LIBC is not None and hasattr(_LIBC, "mallopt"):
    _LIBC.mallopt(_M_ARENA_MAX, arenas)


def release_free_memory() -> None:
  """Hands freed heap pages back to the OS (`malloc_trim`), so chunk buffers do not pile up in RSS."""
  if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
    _LIBC.malloc_trim(0)


def start_writeback(fd: int) -> None:
  """Has the kernel start writing a local file's dirty pages to disk now, without waiting
  (`sync_file_range`), so that the disk works while a conversion goes on and the final fsync
  waits for little."""
  if _LIBC is not None and hasattr(_LIBC, "sync_file_range"):
    _LIBC.sync_file_range(ctypes.c_int(fd), ctypes.c_longlong(0), ctypes.c_longlong(0),
                          ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
