"""The continuous-batching engine: the same answers as `sampling.generate` whatever shares the slots
and whenever a request joins, and no compile after warm-up whatever the requests' settings."""

import contextlib
import textwrap

import jax
import numpy as np
import pytest
from jax import monitoring


import multi_device
from lima_jax import model as model_lib
from lima_jax import sampling
from lima_jax.serve import batcher as batcher_lib
from lima_jax.serve import engine as engine_lib

# Vocabulary 100 padded to 128: padded entries exist and must never be sampled.
CFG = model_lib.ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                            vocab_pad_multiple=128, rope_theta=10000.0, max_seq_len=256)
MAX_LEN = 64
STOP = (7,)


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(lambda x: x * 15.0, model_lib.init_params(CFG, jax.random.key(3)))


def random_prompts(count, seed=0, longest=40):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(2, 100, size=int(n)).tolist() for n in rng.integers(0, longest, size=count)]


@contextlib.contextmanager
def counted_compiles():
  """Counts XLA compilations (jax's backend-compile event) inside the block."""
  events = []
  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)
  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    monitoring.unregister_event_duration_listener(listener)


def staggered(engine, prompts, settings):
  """Submits half the prompts, runs a few rounds (answers are mid-way), then the rest."""
  batcher = batcher_lib.Batcher(engine)
  half = len(prompts) // 2
  handles = [batcher.submit(p, s) for p, s in zip(prompts[:half], settings[:half])]
  for _ in range(3):
    batcher.step()
  handles += [batcher.submit(p, s) for p, s in zip(prompts[half:], settings[half:])]
  batcher.run_until_idle()
  return handles


@pytest.mark.slow
def test_greedy_answers_equal_sampling_generate_alone_under_load(params):
  prompts = random_prompts(18)
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=20, max_len=MAX_LEN, batch_size=1)
  alone = [sampling.generate(CFG, params, [p], sampling_config=scfg, stop_ids=STOP)[0] for p in prompts]
  engine = engine_lib.Engine(CFG, params, slots=4, max_len=MAX_LEN, stop_ids=STOP, steps_per_call=3,
                             min_cache_len=16)
  lengths = []  # The cache's length at each engine call.
  generate = engine.generate
  engine.generate = lambda: (generate(), lengths.append(engine.cache_len))[0]
  budgets = np.random.default_rng(1).integers(3, 21, size=len(prompts))
  settings = [engine_lib.SlotSettings.from_sampling(scfg, max_tokens=int(n)) for n in budgets]
  handles = staggered(engine, prompts, settings)
  assert len({tuple(a.tokens) for a in alone}) > 5  # Answers differ: the comparison means something.
  for a, h, n in zip(alone, handles, budgets):
    assert h.tokens == a.tokens[:n]
    assert h.finish_reason == ("stop" if a.finish_reason == "stop" and a.generated_tokens <= n else "length")
  assert any(h.finish_reason == "stop" for h in handles) and any(h.finish_reason == "length" for h in handles)
  grew = any(a < b for a, b in zip(lengths, lengths[1:]))
  shrank = any(a > b for a, b in zip(lengths, lengths[1:]))
  assert grew and shrank, lengths  # The cache followed the answers in flight.


@pytest.mark.slow
def test_seeded_sampled_answer_is_the_same_alone_and_under_load(params):
  prompts = random_prompts(17, seed=2)
  scfg = sampling.SamplingConfig(max_new_tokens=16, max_len=MAX_LEN, seed=11, temperature=1.5, batch_size=8)
  reference = sampling.generate(CFG, params, prompts, sampling_config=scfg, stop_ids=STOP,
                                prompt_seeds=range(100, 117))
  settings = [engine_lib.SlotSettings.from_sampling(scfg, 16, stream=100 + i) for i in range(17)]
  engine = engine_lib.Engine(CFG, params, slots=5, max_len=MAX_LEN, stop_ids=STOP, steps_per_call=2)
  loaded = staggered(engine, prompts, settings)
  alone = batcher_lib.generate_all(engine, prompts[3:4], settings[3:4])[0]
  assert [h.tokens for h in loaded] == [r.tokens for r in reference]
  assert alone.tokens == loaded[3].tokens
  other_seed = batcher_lib.generate_all(engine, prompts[3:4], [settings[3].replace(seed=12)])[0]
  assert other_seed.tokens != alone.tokens


@pytest.mark.slow
def test_no_compiles_after_warm_up_for_mixed_requests(params):
  engine = engine_lib.Engine(CFG, params, slots=4, max_len=MAX_LEN, stop_ids=STOP, steps_per_call=2,
                             top_logprobs=5, min_cache_len=16)
  assert engine.cache_lengths == [16, 32, 64]
  engine.warm_up(with_score=True)
  rng = np.random.default_rng(3)
  prompts = random_prompts(50, seed=4, longest=60)
  settings = [engine_lib.SlotSettings(
      max_tokens=int(rng.integers(1, 30)), temperature=float(rng.uniform(0.1, 2.0)),
      top_p=float(rng.choice([0.5, 0.9, 1.0])), repetition_penalty=float(rng.choice([1.0, 1.2, 0.9])),
      greedy=bool(rng.random() < 0.3), seed=int(rng.integers(0, 2**40)), stream=i,
      penalize_prompt=bool(rng.random() < 0.5), logprobs=bool(rng.random() < 0.5),
      stop_ids=None if rng.random() < 0.7 else (5, 6)) for i in range(50)]
  with counted_compiles() as compiles:
    batcher = batcher_lib.Batcher(engine)
    handles = [batcher.submit(p, s) for p, s in zip(prompts[:30], settings[:30])]
    for _ in range(4):
      batcher.step()
    handles[0].cancel()
    handles += [batcher.submit(p, s) for p, s in zip(prompts[30:], settings[30:])]
    batcher.run_until_idle()
    scores = engine.score(prompts[5])
  assert compiles == []
  assert all(h.done and h.error is None for h in handles)
  assert len({len(p) for p in prompts}) > 20 and len({sampling.bucket(len(p), MAX_LEN) for p in prompts}) >= 3
  for h, s in zip(handles[1:], settings[1:]):
    assert 1 <= h.generated <= s.max_tokens
    assert len(h.logprobs) == (len(h.tokens) if s.logprobs else 0)
    assert all(0 <= t < CFG.vocab_size for t in h.tokens)
  assert len(scores[0]) == len(prompts[5]) - 1 and scores[1].shape == (len(prompts[5]) - 1, 5)


def test_logprobs_are_the_models_and_scores_match_decoding(params):
  """A greedy token's log-probability is the top one; the decode steps' values equal `score`'s
  over the prompt plus the answer (two programs, one model)."""
  engine = engine_lib.Engine(CFG, params, slots=2, max_len=MAX_LEN, stop_ids=(), steps_per_call=4,
                             top_logprobs=3)
  prompt = random_prompts(1, seed=5)[0]
  h = batcher_lib.generate_all(engine, [prompt], [engine_lib.SlotSettings(
      max_tokens=6, greedy=True, repetition_penalty=1.0, logprobs=True)])[0]
  assert len(h.tokens) == 6 and h.finish_reason == "length"
  for token, lp in zip(h.tokens, h.logprobs):
    assert lp.top_ids[0] == token and lp.top_logprobs[0] == pytest.approx(lp.logprob)
    assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
  chosen, top_ids, _ = engine.score(prompt + h.tokens)
  np.testing.assert_allclose(chosen[len(prompt) - 1:], [lp.logprob for lp in h.logprobs], atol=1e-4)
  assert top_ids[len(prompt) - 1:, 0].tolist() == h.tokens


def test_cancel_frees_the_slot_and_bad_prompts_are_refused(params):
  engine = engine_lib.Engine(CFG, params, slots=1, max_len=MAX_LEN, stop_ids=(), steps_per_call=2)
  batcher = batcher_lib.Batcher(engine, max_queue=2)
  first = batcher.submit([1, 2, 3], engine_lib.SlotSettings(max_tokens=40))
  second = batcher.submit([1, 4], engine_lib.SlotSettings(max_tokens=3))
  with pytest.raises(batcher_lib.QueueFull):
    batcher.submit([1, 5], engine_lib.SlotSettings(max_tokens=3))
  batcher.step()
  first.cancel("abort")
  batcher.step()
  assert first.done and first.finish_reason == "abort" and len(first.tokens) == 2
  batcher.run_until_idle()
  assert second.done and len(second.tokens) == 3
  with pytest.raises(ValueError, match="a prompt of 64 tokens"):
    batcher.submit([1] * MAX_LEN, engine_lib.SlotSettings(max_tokens=3))


@pytest.mark.slow
def test_engine_on_eight_devices_equals_one():
  """On an 8-device mesh (fsdp 4 x tensor 2), weights in default or compiler-chosen layouts, the
  engine's sampled answers equal one device's."""
  script = textwrap.dedent(f"""
      import jax
      from lima_jax import model as model_lib, sampling, sharding
      from lima_jax.serve import batcher, engine
      cfg = model_lib.ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64)
      params = jax.tree.map(lambda x: x * 15.0, model_lib.init_params(cfg, jax.random.key(3)))
      prompts = {random_prompts(10, seed=6)!r}
      scfg = sampling.SamplingConfig(max_new_tokens=8, max_len=64)
      settings = [engine.SlotSettings.from_sampling(scfg, 8, stream=i) for i in range(10)]
      mesh = sharding.make_mesh(dict(data=1, fsdp=4, sequence=1, tensor=2))
      answers = []
      for m, pinned in ((mesh, False), (mesh, True), (None, False)):
        e = engine.Engine(cfg, params, slots=8, max_len=64, stop_ids=(), mesh=m, compiler_weight_layouts=pinned)
        answers.append([h.tokens for h in batcher.generate_all(e, prompts, settings)])
      assert answers[0] == answers[1] == answers[2], answers
      single = sampling.generate(cfg, params, prompts, sampling_config=scfg, stop_ids=(), prompt_seeds=range(10))
      assert answers[1] == [r.tokens for r in single]
      print("ok", len(jax.devices()))
  """)
  multi_device.run_on_8_cpu_devices(script)


@pytest.mark.slow
def test_answer_prompts_keeps_sampling_generates_contract(params):
  """What lima-evaluate runs: truncation, budgets and finish reasons as `sampling.generate`'s."""
  prompts = random_prompts(6, seed=7, longest=50) + [[1] + list(range(20, 80))]
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=12, max_len=MAX_LEN, batch_size=3)
  want = sampling.generate(CFG, params, prompts, sampling_config=scfg, stop_ids=STOP, bos_id=1)
  engine = engine_lib.Engine(CFG, params, slots=3, max_len=MAX_LEN, stop_ids=STOP)
  seen = []
  got = batcher_lib.answer_prompts(engine, prompts, scfg, bos_id=1, on_result=lambda i, r: seen.append(i))
  assert got == want and sorted(seen) == list(range(len(prompts)))
  assert got[-1].prompt_truncated and {r.finish_reason for r in got} >= {"stop", "length"}
