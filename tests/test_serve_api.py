"""lima-serve as a real process on 127.0.0.1, driven by the official `openai` client and raw HTTP:
the endpoints, the fields AlpacaEval and lm-evaluation-harness send, errors, and SIGTERM."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import jax
import openai
import pytest

from lima_jax import checkpoint
from lima_jax import data as data_lib
from lima_jax import inference
from lima_jax import model as model_lib
from lima_jax import sampling
from lima_jax import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
MAX_LEN = 64
KEY = "sk-test-key"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny lima_jax checkpoint with the bundled tokenizer (1024 pieces + EOT)."""
  tok = tokenizer_lib.load_tokenizer(data_lib.bundled_paths()["tokenizer"])
  cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
  params = jax.tree.map(lambda x: x * 20.0, model_lib.init_params(cfg, jax.random.key(0)))
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  checkpoint.save_model(path, params, cfg, tok.to_blob())
  return str(path)


def start_server(ckpt, *extra, env=ENV):
  port = free_port()
  cmd = [sys.executable, os.path.join(REPO, "tools", "serve.py"), "--checkpoint", ckpt, "--port", str(port),
         "--served_model_name", "tiny", "--slots", "3", f"--config.sampling.max_len={MAX_LEN}",
         "--config.sampling.max_new_tokens=12", "--config.serve.max_queue=64", *extra]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(proc.stderr.read()[-3000:])
    try:
      if httpx.get(url + "/health", timeout=1).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      time.sleep(0.5)
  proc.kill()
  raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def server(ckpt):
  proc, url = start_server(ckpt, "--api_key", KEY)
  yield url
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(60) == 0


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server + "/v1", api_key=KEY)


@pytest.fixture(scope="module")
def loaded(ckpt):
  return inference.load_model(ckpt)


def post(server, path, body, key=KEY):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  return httpx.post(server + path, content=body if isinstance(body, str) else json.dumps(body),
                    headers=headers, timeout=60)


CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another one?"}]


@pytest.mark.slow
def test_models_health_and_the_api_key(server, client):
  assert [m.id for m in client.models.list()] == ["tiny"]
  assert httpx.get(server + "/health").status_code == 200
  for key in (None, "wrong"):
    r = post(server, "/v1/chat/completions", {"messages": CHAT}, key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.slow
def test_greedy_chat_equals_sampling_generate_and_streaming_equals_whole(client, loaded):
  """The prompt is laid out as training lays it out: the answer is sampling.generate's."""
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=10, max_len=MAX_LEN)
  want = loaded.generate([loaded.prompt_ids([m["content"] for m in CHAT])], scfg)[0]
  r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=10)
  assert r.choices[0].message.content == loaded.tokenizer.decode(want.tokens)
  assert r.choices[0].finish_reason == {"max_len": "length"}.get(want.finish_reason, want.finish_reason)
  assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.generated_tokens
  stream = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=10,
                                          stream=True, stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
  assert chunks[-1].usage.total_tokens == r.usage.total_tokens
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


@pytest.mark.slow
def test_seeded_sampling_n_and_stop_strings(client):
  ask = dict(model="tiny", messages=CHAT[:1], seed=5, max_tokens=12, temperature=1.5, n=3)
  a, b = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
  texts = [c.message.content for c in a.choices]
  assert texts == [c.message.content for c in b.choices] and len(set(texts)) > 1
  whole = texts[0]
  stop = whole[len(whole) // 2:len(whole) // 2 + 2]
  cut = client.chat.completions.create(**{**ask, "n": 1}, stop=[stop])
  assert cut.choices[0].message.content == whole[:whole.index(stop)]
  assert cut.choices[0].finish_reason == "stop"
  streamed = client.chat.completions.create(**{**ask, "n": 1}, stop=[stop], stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.choices[0].message.content


@pytest.mark.slow
def test_async_client_concurrent_streams(server):
  async def main():
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY)
    async def one(i):
      prompt = f"Question {i}: what is {i} + {i}?"
      whole = await client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=8 + i % 4)
      stream = await client.completions.create(model="tiny", prompt=prompt, temperature=0,
                                               max_tokens=8 + i % 4, stream=True)
      text = "".join([c.choices[0].text async for c in stream if c.choices])
      return whole.choices[0].text, text
    return await asyncio.gather(*(one(i) for i in range(8)))
  for whole, streamed in asyncio.run(main()):
    assert whole == streamed


@pytest.mark.slow
def test_alpaca_eval_weighted_annotator_request(client):
  r = client.chat.completions.create(model="tiny", messages=CHAT[:1], max_tokens=1, temperature=0,
                                     logprobs=True, top_logprobs=5)
  content = r.choices[0].logprobs.content
  assert len(content) == 1 and len(content[0].top_logprobs) == 5
  top = content[0].top_logprobs
  assert top[0].token == content[0].token and top[0].logprob == pytest.approx(content[0].logprob)
  assert r.usage.total_tokens == r.usage.prompt_tokens + 1


@pytest.mark.slow
def test_lm_eval_harness_loglikelihood_request(server, loaded):
  context, continuation = [1] + loaded.tokenizer.encode("The sky is"), loaded.tokenizer.encode(" blue")
  body = {"model": "tiny", "prompt": [context + continuation, context], "max_tokens": 1, "logprobs": 1,
          "echo": True, "temperature": 0}
  r = post(server, "/v1/completions", body)
  assert r.status_code == 200, r.text
  choices = r.json()["choices"]
  assert len(choices) == 2
  lp = choices[0]["logprobs"]
  n = len(context + continuation)
  assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == n + 1
  assert all(v <= 0 for v in lp["token_logprobs"][1:]) and len(lp["top_logprobs"][1]) >= 1
  zero = post(server, "/v1/completions", {**body, "prompt": [context + continuation], "max_tokens": 0}).json()
  assert zero["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n]
  assert zero["usage"]["completion_tokens"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}, 400,
     "messages[0].role"),
    ({"messages": CHAT, "model": "gpt-4"}, 404, "model"),
    ({"messages": CHAT, "temperature": 3}, 400, "temperature"),
    ({"messages": CHAT, "max_tokens": 1000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages"),
    ({"messages": CHAT, "top_logprobs": 5}, 400, "top_logprobs"),
])
def test_bad_requests_get_openai_error_bodies(server, client, body, status, param):
  r = post(server, "/v1/chat/completions", body)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
  assert client.chat.completions.create(model="tiny", messages=CHAT[:1], max_tokens=2).choices  # Still serving.


def serve_metrics(url) -> dict[str, float]:
  """/metrics' samples by name (Prometheus text format)."""
  lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
  return {name: float(value) for name, value in (l.split() for l in lines if l and not l.startswith("#"))}


@pytest.mark.slow
def test_disconnect_frees_the_slot_and_sigterm_finishes_in_flight(ckpt):
  # One token a round and 1000 to go, so an abandoned stream that kept its slot would run 1000 rounds.
  proc, url = start_server(ckpt, "--slots", "1", "--config.sampling.max_len=1024",
                           "--config.sampling.max_new_tokens=1000", "--config.serve.steps_per_call=1")
  try:
    body = {"prompt": "Tell a story", "max_tokens": 1000, "stream": True, "temperature": 0,
            "stop": [], "repetition_penalty": 1.0}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
      lines = r.iter_lines()
      for _ in range(6):
        next(lines)
      assert serve_metrics(url)["lima_serve_requests_running"] == 1
    at_close = serve_metrics(url)["lima_serve_rounds_total"]
    deadline = time.time() + 10
    while serve_metrics(url)["lima_serve_requests_running"] and time.time() < deadline:
      time.sleep(0.01)
    freed = serve_metrics(url)
    assert freed["lima_serve_requests_running"] == 0 and freed["lima_serve_cancelled_total"] == 1
    assert freed["lima_serve_rounds_total"] - at_close <= 2, (at_close, freed)  # Freed within a round or so.
    assert freed["lima_serve_rounds_total"] < 500, freed
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    client = httpx.Client(timeout=120)
    pending = []
    import threading  # pylint: disable=g-import-not-at-top
    def ask():
      pending.append(client.post(url + "/v1/completions", json={"prompt": "Story", "max_tokens": 40}))
    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    thread.join(120)
    assert pending and pending[0].status_code == 200 and pending[0].json()["choices"][0]["text"] is not None
    assert proc.wait(60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
