"""The judge as one method: chat messages in, reply text and token usage out.

`JudgeClient` is that interface; the run loop (`judge.run`) knows nothing else about the judge,
so a judge that runs in-process (a checkpoint on the decoding engine) is one more class with the
same `complete`. `ChatCompletionsClient` is the judge over HTTP: any OpenAI-compatible
`/chat/completions` endpoint (OpenAI, vLLM, `lima-serve`).

It speaks HTTP through httpx rather than the `openai` package so that every attempt is ours to
count, to time out and to retry: 429, 5xx, timeouts and dropped connections are retried a bounded
number of times with exponential backoff, waiting what a `Retry-After` header asks (seconds or an
HTTP date) instead when it is given; other 4xx answers are the user's to fix (key, model, URL)
and stop the run.
"""

import dataclasses
import email.utils
import random
import threading
import time
from typing import Protocol, Sequence

import httpx

from lima_jax import chat_template
from lima_jax import errors

RETRIED_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  usage: dict  # prompt_tokens, completion_tokens, total_tokens (0 when the endpoint gives none).
  finish_reason: str | None = None  # As the endpoint said (stop, length), where it did.


class JudgeClient(Protocol):
  """What the run loop needs of a judge."""

  model: str

  def complete(self, messages: Sequence[dict]) -> Reply:
    """The judge's reply to `messages`; raises `JudgeUnavailable` once it gives up."""


class JudgeUnavailable(RuntimeError):
  """The endpoint kept failing (429 / 5xx / timeouts) past the retry budget."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  max_retries: int = 6  # Extra attempts after the first.
  backoff_seconds: float = 1.0  # The first wait; doubled each retry, with jitter.
  max_backoff_seconds: float = 60.0  # Also caps what Retry-After may ask.

  def wait(self, retry: int, retry_after: float | None) -> float:
    if retry_after is not None:
      return min(max(retry_after, 0.0), self.max_backoff_seconds)
    base = min(self.backoff_seconds * 2 ** retry, self.max_backoff_seconds)
    return base * (0.5 + random.random() / 2)


def parse_retry_after(value: str | None) -> float | None:
  """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
  if not value:
    return None
  try:
    return float(value)
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return when.timestamp() - time.time()


class RequestCounter:
  """HTTP attempts, retries and tokens across threads, for the run's summary line."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests = self.retries = self.prompt_tokens = self.completion_tokens = 0

  def attempt(self, retry: bool) -> None:
    with self._lock:
      self.requests += 1
      self.retries += int(retry)

  def tokens(self, usage: dict) -> None:
    with self._lock:
      self.prompt_tokens += usage["prompt_tokens"]
      self.completion_tokens += usage["completion_tokens"]


def _usage(body: dict) -> dict:
  usage = body.get("usage") or {}
  prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": int(usage.get("total_tokens") or prompt + completion)}


def _reply_text(body: dict, url: str) -> tuple[str, str | None]:
  try:
    choice = body["choices"][0]
    content = choice["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise JudgeUnavailable(f"{url}: the reply has no choices[0].message.content") from None
  return content or "", choice.get("finish_reason")


def _refusal(response: httpx.Response, url: str, model: str) -> errors.InputError:
  """A 4xx the user must fix, as the flag to change and what the endpoint said."""
  said = " ".join(response.text.split())[:300]
  hint = {401: "--judge_api_key_env (the key was refused)", 403: "--judge_api_key_env (not allowed)",
          404: f"--judge_url / --judge_model (no such endpoint or model {model!r})"}.get(
              response.status_code, "the request")
  return errors.InputError(f"{url}: HTTP {response.status_code} from the judge; check {hint}: {said}")


class ChatCompletionsClient:
  """`POST {base_url}/chat/completions`, as the `openai` package's `base_url` (e.g. .../v1; a URL
  that already ends in /chat/completions is taken as it is)."""

  def __init__(self, base_url: str, model: str, *, api_key: str | None = None, temperature: float = 0.0,
               max_tokens: int = 1024, timeout_seconds: float = 120.0, retry: RetryPolicy = RetryPolicy(),
               counter: RequestCounter | None = None, fold_system: bool = False, settings: dict | None = None):
    self.model = model
    self.fold_system = fold_system  # Send no system message (e.g. to lima-serve's LIMA models).
    base = base_url.rstrip("/")
    self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
    self._settings = {"temperature": temperature, "max_tokens": max_tokens, **(settings or {})}
    self._retry = retry
    self.counter = counter or RequestCounter()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    self._http = httpx.Client(headers=headers, timeout=timeout_seconds)

  def close(self) -> None:
    self._http.close()

  def _reply(self, response: httpx.Response) -> Reply | None:
    try:
      body = response.json()
    except ValueError:
      return None  # Cut short or not JSON: asked again like a 5xx.
    text, finish_reason = _reply_text(body, self.url)
    reply = Reply(text, _usage(body), finish_reason)
    self.counter.tokens(reply.usage)
    return reply

  def complete(self, messages: Sequence[dict], extra: dict | None = None) -> Reply:
    """`extra`: more request fields for this request only (e.g. its seed)."""
    messages = chat_template.fold_system(messages) if self.fold_system else list(messages)
    payload = {"model": self.model, "messages": messages, **self._settings, **(extra or {})}
    last_problem = ""
    for attempt in range(self._retry.max_retries + 1):
      self.counter.attempt(retry=attempt > 0)
      retry_after = None
      try:
        response = self._http.post(self.url, json=payload)
      except (httpx.TimeoutException, httpx.TransportError) as e:
        last_problem = f"{type(e).__name__}: {e}"
      else:
        if response.status_code == 200:
          reply = self._reply(response)
          if reply is not None:
            return reply
          last_problem = "a 200 reply that is not JSON"
        if response.status_code not in RETRIED_STATUSES:
          raise _refusal(response, self.url, self.model)
        last_problem = f"HTTP {response.status_code}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
      if attempt < self._retry.max_retries:
        time.sleep(self._retry.wait(attempt, retry_after))
    raise JudgeUnavailable(f"{self.url}: no answer after {self._retry.max_retries + 1} attempts "
                           f"(last: {last_problem}); rerun the same command to resume")
