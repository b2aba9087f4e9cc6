"""Runs a test script in a fresh process that sees 8 simulated CPU devices (XLA's host platform
count is fixed when jax starts, so a mesh test cannot change it in the test session itself)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_8_cpu_devices(script: str, timeout: int = 600) -> str:
  """Runs `script` (which ends by printing "ok <device count>"); returns its stdout."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ok 8" in proc.stdout, proc.stdout[-3000:]
  return proc.stdout
