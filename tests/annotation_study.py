"""A small annotation study for the tests: two answer files and a real `lima-annotate` server.

The answers say which system wrote them ("answer of A ..."), so a test can check that a label
maps back to the right file whatever side the page showed it on.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOSTILE = '<b>bold?</b> <img src=x onerror="document.title=\'pwned\'"><script>window.pwned = 1;</script>'


def conversations(n: int) -> list[list[str]]:
  """n prompts; the second is a multi-turn conversation."""
  turns = [[f"Question {i}: how do I do task {i}?"] for i in range(n)]
  if n > 1:
    turns[1] = ["Name a colour.", "Blue.", "And another one, please?"]
  return turns


def answer_lines(system: str, n: int, hostile_id: str | None = None) -> list[dict]:
  lines = []
  for i, conversation in enumerate(conversations(n)):
    pid = f"p{i}"
    response = f"answer of {system} to p{i}\nsecond line"
    if pid == hostile_id:
      response = f"answer of {system} to p{i} " + HOSTILE
    lines.append({"id": pid, "conversation": conversation, "response": response,
                  "generator": f"system-{system}", "finish_reason": "stop"})
  return lines


def write_jsonl(path, lines) -> str:
  pathlib.Path(path).write_text("".join(json.dumps(r) + "\n" for r in lines))
  return str(path)


def write_study(directory, n: int = 6, hostile_id: str | None = None) -> tuple[str, str]:
  directory = pathlib.Path(directory)
  return (write_jsonl(directory / "A.jsonl", answer_lines("A", n, hostile_id)),
          write_jsonl(directory / "B.jsonl", answer_lines("B", n, hostile_id)))


def system_of(text: str) -> str:
  """"a" or "b": which file an answer shown on the page came from."""
  return "a" if text.startswith("answer of A") else "b"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class AnnotateServer:
  """`python tools/annotate.py ...` on 127.0.0.1 at a free port, until `stop`."""

  def __init__(self, *args: str, port: int | None = None, env: dict | None = None, timeout: float = 60.0):
    self.port = port or free_port()
    self.url = f"http://127.0.0.1:{self.port}/"
    self.proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "annotate.py"), "--port", str(self.port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    deadline = time.time() + timeout
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"lima-annotate exited {self.proc.returncode}: {self.proc.stdout.read()}")
      try:
        urllib.request.urlopen(self.url, timeout=1).close()
        return
      except OSError:
        if time.time() > deadline:
          self.stop()
          raise
        time.sleep(0.1)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


def browser_paths() -> tuple[str | None, str | None]:
  """Chromium and its driver (Debian's chromium + chromium-driver), or None where absent."""
  binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
  return binary, shutil.which("chromedriver")


def chrome(width: int = 1400, height: int = 1000):
  """Headless Chromium under Selenium, with the system's chromedriver (no download)."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome import service  # pylint: disable=g-import-not-at-top
  binary, driver = browser_paths()
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                   f"--window-size={width},{height}", "--hide-scrollbars"):
    options.add_argument(argument)
  return webdriver.Chrome(service=service.Service(executable_path=driver), options=options)
