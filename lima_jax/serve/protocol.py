"""OpenAI's request fields, checked and turned into engine requests; OpenAI's error body.

Only what the server understands is accepted: an unknown value of a known field is a 400 naming
the field (`param`), as OpenAI's and vLLM's servers answer. Fields a client may send that change
nothing here (`user`, `presence_penalty` 0, ...) are ignored, as vLLM ignores them.
"""

import dataclasses
import secrets
from typing import Any, Sequence

from lima_jax import sampling
from lima_jax.serve import engine as engine_lib

MAX_N = 16
MAX_STOP_STRINGS = 4  # OpenAI's limit.


class APIError(Exception):
  """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
  return APIError(400, f"{param}: {message}", param=param)


@dataclasses.dataclass(frozen=True)
class Decoding:
  """One request's decoding: the engine's settings for each of its `n` choices, plus host-side
  stop strings and what to report."""
  max_tokens: int | None  # None: as many as the context leaves, up to config.sampling.max_new_tokens.
  settings: engine_lib.SlotSettings  # max_tokens there is filled in per prompt.
  n: int
  stop: tuple[str, ...]
  top_logprobs: int  # Alternatives per token (0: none); only with `logprobs`.
  logprobs: bool
  stream: bool
  include_usage: bool
  echo: bool = False


def _number(body: dict, name: str, default, low: float, high: float, *, integer: bool = False,
            low_open: bool = False):
  value = body.get(name)
  if value is None:
    return default
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise bad(name, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
  if value < low or value > high or (low_open and value == low):
    raise bad(name, f"{value} is out of range; expected {'>' if low_open else '>='} {low} and <= {high}")
  return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
  value = body.get(name, default)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise bad(name, f"expected true or false, got {value!r}")
  return value


def _stop_strings(body: dict) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise bad("stop", "expected a non-empty string or a list of them")
  if len(stops) > MAX_STOP_STRINGS:
    raise bad("stop", f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS}")
  return tuple(stops)


def parse_decoding(body: dict, defaults: sampling.SamplingConfig, *, chat: bool, max_top_logprobs: int,
                   max_len: int) -> Decoding:
  """The decoding fields of a chat or completions request; omitted ones take LIMA's defaults."""
  max_tokens = body.get("max_completion_tokens") if chat else None
  name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
  max_tokens = _number(body, name, None, 0 if not chat else 1, max_len, integer=True)
  temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
  greedy = temperature == 0 or (defaults.greedy and body.get("temperature") is None)
  top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, low_open=True)
  penalty = _number(body, "repetition_penalty", defaults.repetition_penalty, 0.0, 10.0, low_open=True)
  n = _number(body, "n", 1, 1, MAX_N, integer=True)
  seed = _number(body, "seed", None, -(2 ** 63), 2 ** 64 - 1, integer=True)
  if seed is None:
    seed = secrets.randbits(31) if not defaults.greedy else defaults.seed
  stream = _bool(body, "stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise bad("stream_options", "expected an object")
  include_usage = _bool(options, "include_usage")
  if chat:
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 0, max_top_logprobs, integer=True)
    if top and not logprobs:
      raise bad("top_logprobs", "needs logprobs: true")
    echo = False
  else:
    value = _number(body, "logprobs", None, 0, max_top_logprobs, integer=True)
    logprobs, top = value is not None, value or 0
    echo = _bool(body, "echo")
    if max_tokens == 0 and not echo:
      raise bad("max_tokens", "0 needs echo: true (scoring the prompt)")
  settings = engine_lib.SlotSettings(
      max_tokens=1, temperature=float(temperature) if not greedy else 1.0, top_p=float(top_p),
      repetition_penalty=float(penalty), greedy=bool(greedy), seed=int(seed),
      penalize_prompt=defaults.penalty_scope == "all", logprobs=logprobs)
  return Decoding(max_tokens, settings, n, _stop_strings(body), top, logprobs, stream, include_usage, echo)


def chat_turns(body: dict) -> list[str]:
  """The user/assistant turns of `messages`, which must alternate and end on a user turn."""
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise bad("messages", "expected a non-empty list of {role, content} objects")
  turns = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise bad(where, "expected an object with role and content")
    role = m.get("role")
    if role in ("system", "developer"):
      raise bad(f"{where}.role", f"{role!r}: a LIMA model is trained without a system prompt "
                "(its chat template refuses one); send user and assistant turns only")
    want = "user" if i % 2 == 0 else "assistant"
    if role != want:
      raise bad(f"{where}.role", f"expected {want!r} (turns alternate user, assistant, ..., "
                f"starting with user), got {role!r}")
    turns.append(_content_text(m.get("content"), f"{where}.content"))
  if len(turns) % 2 == 0:
    raise bad("messages", "the last message must be the user's")
  return turns


def _content_text(content: Any, where: str) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise bad(where, "expected a string or a list of {type: text, text} parts")


def completion_prompts(body: dict, encode, vocab_size: int) -> list[list[int]]:
  """`prompt` as token ids: a string, a list of strings, a list of ids, or a list of id lists."""
  prompt = body.get("prompt")
  if isinstance(prompt, str):
    return [encode(prompt)]
  if isinstance(prompt, list) and prompt:
    if all(isinstance(p, str) for p in prompt):
      return [encode(p) for p in prompt]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      return [_checked_ids(prompt, "prompt", vocab_size)]
    if all(isinstance(p, list) for p in prompt):
      return [_checked_ids(p, f"prompt[{i}]", vocab_size) for i, p in enumerate(prompt)]
  raise bad("prompt", "expected a string, a list of strings, a list of token ids or a list of such lists")


def _checked_ids(ids: Sequence, where: str, vocab_size: int) -> list[int]:
  if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
    raise bad(where, "expected a non-empty list of token ids")
  wrong = [t for t in ids if not 0 <= t < vocab_size]
  if wrong:
    raise bad(where, f"token id {wrong[0]} is outside the vocabulary [0, {vocab_size})")
  return list(ids)


def answer_budget(decoding: Decoding, prompt_len: int, max_len: int, default_max: int, param: str) -> int:
  """Tokens the answer may have; 400 when the prompt, or prompt + max_tokens, exceed the context."""
  room = max_len - prompt_len
  if room < 1:
    raise bad(param, f"the prompt has {prompt_len} tokens; this model's context is {max_len} "
              f"tokens, which leaves no room for an answer")
  if decoding.max_tokens is None:
    return min(default_max, room)
  if decoding.max_tokens > room:
    raise bad("max_tokens", f"this model's maximum context length is {max_len} tokens; you asked "
              f"for {prompt_len + decoding.max_tokens} ({prompt_len} in the prompt, "
              f"{decoding.max_tokens} for the answer)")
  return decoding.max_tokens
