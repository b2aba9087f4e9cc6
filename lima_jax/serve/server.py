"""The OpenAI-compatible HTTP API over the batcher (FastAPI): /v1/models, /health,
/v1/chat/completions and /v1/completions, streamed or not (docs/serving.md lists the fields).

Requests wait on the engine thread through an asyncio event per request, set from that thread
as tokens arrive; a client that goes away mid-stream cancels its answers, which frees their slots
at the engine's next round.
"""

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Sequence

import fastapi
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from lima_jax import sampling
from lima_jax.serve import batcher as batcher_lib
from lima_jax.serve import protocol
from lima_jax.serve import text as text_lib

APIError = protocol.APIError


class Service:
  """What the endpoints share: the loaded model, its batcher, LIMA's defaults, the model's name."""

  def __init__(self, loaded, batcher: batcher_lib.Batcher, defaults: sampling.SamplingConfig,
               model_name: str, api_key: str | None = None):
    self.loaded, self.batcher, self.defaults = loaded, batcher, defaults
    self.engine = batcher.engine
    self.model_name, self.api_key = model_name, api_key
    self.tokenizer = loaded.tokenizer
    self.created = int(time.time())

  def token_text(self, token: int) -> str:
    if token == self.tokenizer.eot_id:
      return self.tokenizer.eot_text
    return self.tokenizer.decode([token])

  def encode_text(self, text: str) -> list[int]:
    bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
    return bos + self.tokenizer.encode(text)

  def submit(self, prompt: list[int], decoding: protocol.Decoding, budget: int, waiter: "Waiter"):
    """The request's `n` answers, each its own random stream; 503 when the queue is full."""
    handles = []
    try:
      for i in range(decoding.n):
        settings = decoding.settings.replace(max_tokens=budget, stream=i)
        handles.append(self.batcher.submit(prompt, settings, waiter.notify))
    except batcher_lib.QueueFull as e:
      for h in handles:
        h.cancel("abort")
      raise APIError(503, f"the server is busy: {e}; retry later", code="queue_full",
                     kind="service_unavailable_error") from None
    return handles


class Waiter:
  """Wakes the request's coroutine whenever one of its answers changes (from the engine thread)."""

  def __init__(self):
    self.loop = asyncio.get_running_loop()
    self.event = asyncio.Event()

  def notify(self, _handle) -> None:
    self.loop.call_soon_threadsafe(self.event.set)

  async def wait(self) -> None:
    await self.event.wait()
    self.event.clear()


async def _json_body(request: fastapi.Request) -> dict:
  raw = await request.body()
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise APIError(400, f"the request body is not valid JSON ({e})") from None
  if not isinstance(body, dict):
    raise APIError(400, "the request body must be a JSON object")
  return body


def _finish_reason(handle, text: text_lib.AnswerText) -> str:
  if text.stopped:
    return "stop"
  if handle.error is not None:
    raise APIError(500, f"the engine failed: {handle.error}", kind="server_error")
  return {"max_len": "length"}.get(handle.finish_reason, handle.finish_reason)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _chat_logprobs(service: Service, entries, k: int) -> list[dict]:
  def item(token, lp):
    text = service.token_text(token)
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
  return [{**item(token, e.logprob),
           "top_logprobs": [item(t, lp) for t, lp in zip(e.top_ids[:k], e.top_logprobs[:k])]}
          for token, e in entries]


def _stop_if_seen(handle, text: text_lib.AnswerText, final: bool) -> str:
  """The answer's new text; a stop string found cancels the rest of the answer."""
  piece = text.delta(handle.tokens, final)
  if text.stopped and not handle.done:
    handle.cancel("stop")
  return piece


async def _wait_all(handles, waiter: Waiter, texts) -> None:
  try:
    while not all(h.done for h in handles):
      for h, t in zip(handles, texts):
        t.text(h.tokens, final=False)
        if t.stopped and not h.done:
          h.cancel("stop")
      await waiter.wait()
  finally:
    for h in handles:
      if not h.done:
        h.cancel("abort")


def _sse(payload: Any) -> str:
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(service: Service, handles, waiter: Waiter, decoding: protocol.Decoding, chunk,
                  prompt_tokens: int):
  """SSE chunks for every choice as tokens arrive, then usage (when asked) and [DONE]."""
  texts = [text_lib.AnswerText(service.tokenizer.decode, decoding.stop) for _ in handles]
  reported = [0] * len(handles)
  closed = [False] * len(handles)
  try:
    for i in range(len(handles)):
      yield _sse(chunk(i, "", None, None, first=True))
    while not all(closed):
      for i, (h, t) in enumerate(zip(handles, texts)):
        if closed[i]:
          continue
        done = h.done
        piece = _stop_if_seen(h, t, final=done)
        entries = list(zip(h.tokens[reported[i]:], h.logprobs[reported[i]:])) if decoding.logprobs else []
        reported[i] = len(h.tokens)
        if piece or entries:
          yield _sse(chunk(i, piece, entries, None))
        if done or t.stopped:
          if not done:
            continue  # Cancelled for a stop string: ends at the engine's next round.
          yield _sse(chunk(i, "", None, _finish_reason(h, t)))
          closed[i] = True
      if not all(closed):
        await waiter.wait()
    if decoding.include_usage:
      yield _sse(chunk(None, "", None, None, usage=_usage(prompt_tokens, sum(h.generated for h in handles))))
    yield "data: [DONE]\n\n"
  finally:
    for h in handles:
      if not h.done:
        h.cancel("abort")


_METRICS = {"running": ("gauge", "requests decoding in a slot"),
            "waiting": ("gauge", "requests queued for a slot"),
            "rounds": ("counter", "engine generate calls"),
            "cancelled": ("counter", "answers cancelled (stop string, client gone, shutdown)")}


def _prometheus(stats: dict[str, int]) -> str:
  """The batcher's counters in Prometheus' text format (as vLLM's /metrics serves its own)."""
  lines = []
  for name, (kind, text) in _METRICS.items():
    metric = f"lima_serve_requests_{name}" if kind == "gauge" else f"lima_serve_{name}_total"
    lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}", f"{metric} {stats[name]}"]
  return "\n".join(lines) + "\n"


def create_app(service: Service) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title="lima-serve", docs_url=None, redoc_url=None)

  @app.exception_handler(APIError)
  async def api_error(_request, e: APIError):
    return responses.JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def http_error(_request, e):
    return responses.JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

  @app.middleware("http")
  async def check_key(request: fastapi.Request, call_next):
    if service.api_key and request.url.path.startswith("/v1"):
      given = request.headers.get("authorization", "")
      token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
      if not hmac.compare_digest(token.encode(), service.api_key.encode()):
        error = APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                         code="invalid_api_key")
        return responses.JSONResponse(error.body(), status_code=401)
    return await call_next(request)

  @app.get("/health")
  async def health():
    return responses.Response(status_code=200)

  @app.get("/metrics")
  async def metrics():
    return responses.PlainTextResponse(_prometheus(service.batcher.stats()))

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                        "created": service.created, "owned_by": "lima_jax",
                                        "max_model_len": service.engine.max_len}]}

  @app.post("/v1/chat/completions")
  async def chat(request: fastapi.Request):
    return await chat_completions(service, await _json_body(request))

  @app.post("/v1/completions")
  async def complete(request: fastapi.Request):
    return await completions(service, await _json_body(request))

  return app


def _completion_logprobs(service: Service, entries, k: int, offset: int = 0) -> dict:
  """Legacy completions logprobs: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for token, e in entries:
    text = service.token_text(token)
    out["tokens"].append(text)
    out["text_offset"].append(offset)
    offset += len(text)
    if e is None:
      out["token_logprobs"].append(None)
      out["top_logprobs"].append(None)
      continue
    out["token_logprobs"].append(e.logprob)
    top = {service.token_text(t): lp for t, lp in zip(e.top_ids[:k], e.top_logprobs[:k])}
    top.setdefault(text, e.logprob)
    out["top_logprobs"].append(top)
  return out


async def _echo(service: Service, prompt: Sequence[int], decoding: protocol.Decoding):
  """The prompt's text and, with logprobs, each prompt token's (the first has none)."""
  text = service.tokenizer.decode(prompt)
  if not decoding.logprobs:
    return text, []
  chosen, ids, lps = await asyncio.to_thread(service.engine.score, list(prompt))
  entries = [(prompt[0], None)] + [
      (t, batcher_lib.TokenLogprobs(float(c), i.tolist(), l.tolist()))
      for t, c, i, l in zip(prompt[1:], chosen, ids, lps)]
  return text, entries


def _completion_choice(service: Service, index: int, handle, text, echo, decoding) -> dict:
  prefix, prompt_entries = echo if echo is not None else ("", [])
  answer = text.text(handle.tokens, final=True) if handle is not None else ""
  logprobs = None
  if decoding.logprobs:
    entries = list(prompt_entries)
    if handle is not None:
      entries += list(zip(handle.tokens, handle.logprobs))
    logprobs = _completion_logprobs(service, entries, decoding.top_logprobs)
  finish = _finish_reason(handle, text) if handle is not None else "length"
  return {"index": index, "text": prefix + answer, "logprobs": logprobs, "finish_reason": finish}


def _check_model(service: Service, body: dict) -> None:
  model = body.get("model")
  if model is not None and model != service.model_name:
    raise APIError(404, f"the model {model!r} does not exist; this server serves {service.model_name!r}",
                   param="model", code="model_not_found")


def _decoding(service: Service, body: dict, chat: bool) -> protocol.Decoding:
  _check_model(service, body)
  return protocol.parse_decoding(body, service.defaults, chat=chat, max_top_logprobs=service.engine.top_logprobs,
                                 max_len=service.engine.max_len)


def _chat_chunk(service: Service, rid: str, created: int, decoding: protocol.Decoding):
  def chunk(i, piece, entries, finish, first=False, usage=None):
    payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": service.model_name,
               "choices": []}
    if i is not None:
      delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
      logprobs = {"content": _chat_logprobs(service, entries, decoding.top_logprobs)} if entries else None
      payload["choices"] = [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    if decoding.include_usage:
      payload["usage"] = usage
    return payload
  return chunk


def _completion_chunk(service: Service, rid: str, created: int, decoding: protocol.Decoding):
  def chunk(i, piece, entries, finish, first=False, usage=None):
    payload = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name,
               "choices": []}
    if i is not None and not first:
      logprobs = _completion_logprobs(service, entries, decoding.top_logprobs) if entries else None
      payload["choices"] = [{"index": i, "text": piece, "logprobs": logprobs, "finish_reason": finish}]
    if decoding.include_usage:
      payload["usage"] = usage
    return payload
  return chunk


async def chat_completions(service: Service, body: dict):
  decoding = _decoding(service, body, chat=True)
  prompt = service.loaded.prompt_ids(protocol.chat_turns(body))
  budget = protocol.answer_budget(decoding, len(prompt), service.engine.max_len,
                                  service.defaults.max_new_tokens, "messages")
  waiter = Waiter()
  handles = service.submit(prompt, decoding, budget, waiter)
  rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
  if decoding.stream:
    chunks = _stream(service, handles, waiter, decoding, _chat_chunk(service, rid, created, decoding), len(prompt))
    return responses.StreamingResponse(chunks, media_type="text/event-stream")
  texts = [text_lib.AnswerText(service.tokenizer.decode, decoding.stop) for _ in handles]
  await _wait_all(handles, waiter, texts)
  choices = []
  for i, (h, t) in enumerate(zip(handles, texts)):
    logprobs = None
    if decoding.logprobs:
      logprobs = {"content": _chat_logprobs(service, zip(h.tokens, h.logprobs), decoding.top_logprobs)}
    choices.append({"index": i, "message": {"role": "assistant", "content": t.text(h.tokens, final=True)},
                    "logprobs": logprobs, "finish_reason": _finish_reason(h, t)})
  return {"id": rid, "object": "chat.completion", "created": created, "model": service.model_name,
          "choices": choices, "usage": _usage(len(prompt), sum(h.generated for h in handles))}


async def completions(service: Service, body: dict):
  decoding = _decoding(service, body, chat=False)
  prompts = protocol.completion_prompts(body, service.encode_text, service.engine.model_config.vocab_size)
  if decoding.stream and (len(prompts) > 1 or decoding.echo):
    raise protocol.bad("stream", "streaming takes one prompt and no echo")
  budgets = [protocol.answer_budget(decoding, len(p), service.engine.max_len,
                                    service.defaults.max_new_tokens, "prompt") for p in prompts]
  waiter = Waiter()
  groups = [service.submit(p, decoding, budget, waiter) if budget else [] for p, budget in zip(prompts, budgets)]
  rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
  if decoding.stream:
    chunks = _stream(service, groups[0], waiter, decoding, _completion_chunk(service, rid, created, decoding),
                     len(prompts[0]))
    return responses.StreamingResponse(chunks, media_type="text/event-stream")
  all_handles = [h for g in groups for h in g]
  texts = {id(h): text_lib.AnswerText(service.tokenizer.decode, decoding.stop) for h in all_handles}
  await _wait_all(all_handles, waiter, [texts[id(h)] for h in all_handles])
  choices = []
  for p, group in zip(prompts, groups):
    echo = await _echo(service, p, decoding) if decoding.echo else None
    for h in group or [None]:
      choices.append(_completion_choice(service, len(choices), h, texts.get(id(h)), echo, decoding))
  return {"id": rid, "object": "text_completion", "created": created, "model": service.model_name,
          "choices": choices, "usage": _usage(sum(len(p) for p in prompts), sum(h.generated for h in all_handles))}
