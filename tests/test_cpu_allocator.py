"""`process.restart_with_cpu_allocator`: CPU runs restart once with the glibc settings, and never
when the user opted out or chose allocator settings of their own."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ("import os; from lima_jax import process; process.restart_with_cpu_allocator(); "
          "print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('MALLOC_MMAP_THRESHOLD_'))")

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the restart is for glibc's malloc only")


def _run(**env):
  base = {k: v for k, v in os.environ.items()
          if not k.startswith("MALLOC_") and k != "LIMA_JAX_CPU_ALLOCATOR"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env={**base, "JAX_PLATFORMS": "cpu",
                                                             "PYTHONPATH": str(ROOT), **env},
                        capture_output=True, text=True, timeout=120, check=True)
  return proc.stdout.strip()


def test_a_cpu_run_restarts_with_the_settings():
  assert _run() == f"1 {1 << 32}"


def test_opting_out_or_own_settings_are_respected():
  assert _run(LIMA_JAX_CPU_ALLOCATOR="0") == "None None"
  assert _run(MALLOC_ARENA_MAX="4") == "4 None"
  assert _run(JAX_PLATFORMS="tpu") == "None None"
