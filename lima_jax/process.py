"""Process set-up the entry points run before jax loads: the CPU over an absent TPU, the CPU
allocator restart, libtpu's environment for compile-only runs. Stdlib only at import time (the
commands import it first), and nothing happens on import: only the entry points call it.
"""

import glob
import importlib.util
import os
import platform
import sys
import tempfile


def _tpu_chips_attached() -> bool:
  """Whether this host has TPU chips (Google PCI devices, or the accel / vfio device files)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _accelerator_attached() -> bool:
  """A TPU or an NVIDIA GPU on this host."""
  return _tpu_chips_attached() or os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def _say(message: str) -> None:
  """A process set-up line on stderr: the entry points do these things visibly."""
  print(f"lima_jax: {message}", file=sys.stderr, flush=True)


def default_to_cpu_without_tpu(log: bool = False) -> bool:
  """Keeps an installed libtpu from cluttering CPU runs; returns True when it chose the CPU.

  With libtpu installed, JAX tries to start the TPU runtime in every process, and on a host
  with no TPU chips libtpu prints initialisation errors before JAX falls back to the CPU. When
  the user has not chosen platforms (JAX_PLATFORMS unset), libtpu is importable, no TPU and
  no NVIDIA GPU is attached, this selects the CPU before any backend starts. Only entry points
  call it (`import lima_jax` changes nothing); `LIMA_JAX_AUTO_CPU=0` turns it off. Compiling
  *for* TPU topologies (tools/aot_compile.py) is unaffected: it loads libtpu's compiler directly.
  """
  if os.environ.get("LIMA_JAX_AUTO_CPU", "1") == "0":
    return False
  if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
    return False
  if not libtpu_available():
    return False
  if _accelerator_attached():
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax = sys.modules.get("jax")
  if jax is not None and hasattr(jax, "config"):
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if not xla_bridge.backends_are_initialized():
      jax.config.update("jax_platforms", "cpu")
  if log:
    _say("libtpu is installed but no TPU is attached: running on the CPU (JAX_PLATFORMS=cpu; "
         "LIMA_JAX_AUTO_CPU=0 turns this off)")
  return True


def prepare_libtpu_environment(log_dir: str | None = None) -> str:
  """Environment libtpu reads when it loads; call before the first topology is built.

  No metadata server is queried (no network), the lock another libtpu process holds on this
  host is shared instead of fatal, and the compiler's INFO log (the only place with its full
  buffer report) goes to `log_dir`. Returns that directory.
  """
  log_dir = log_dir or os.environ.get("TPU_LOG_DIR") or tempfile.mkdtemp(prefix="lima_aot_")
  os.makedirs(log_dir, exist_ok=True)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Run nothing on a TPU; only compile for one.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # Only to start the runtime quietly.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  os.environ.setdefault("TPU_LOG_DIR", log_dir)
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "0")
  return os.environ["TPU_LOG_DIR"]


def libtpu_available() -> bool:
  """Whether libtpu (the TPU runtime and compiler) is installed; it may be, on a host with no TPU."""
  return importlib.util.find_spec("libtpu") is not None


# glibc malloc settings for CPU runs: see `restart_with_cpu_allocator`.
CPU_ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
}


def restart_with_cpu_allocator(log: bool = False) -> None:
  """Re-executes this command once with `CPU_ALLOCATOR_ENV`, when it will compute on the CPU.

  XLA:CPU allocates a step's temporaries afresh on every run, and glibc would unmap and
  page-fault them in again each step; one arena and a high mmap threshold keep the freed memory
  for the next step (measured: docs/training.md, "Allocator"). The variables must be set before
  the process starts, hence the restart; it happens at most once, never when the user has set any
  of them, and `LIMA_JAX_CPU_ALLOCATOR=0` turns it off.
  """
  if os.environ.get("LIMA_JAX_CPU_ALLOCATOR", "1") == "0":
    return
  if any(name in os.environ for name in CPU_ALLOCATOR_ENV):
    return
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and platforms != "cpu":
    return
  if not platforms and _accelerator_attached():
    return
  argv = list(getattr(sys, "orig_argv", []))
  if len(argv) < 2:  # An interactive interpreter: nothing to restart.
    return
  if log:
    _say("restarting once with " + " ".join(f"{k}={v}" for k, v in CPU_ALLOCATOR_ENV.items()) +
         " for faster CPU steps (LIMA_JAX_CPU_ALLOCATOR=0 turns this off)")
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], {**os.environ, **CPU_ALLOCATOR_ENV})
