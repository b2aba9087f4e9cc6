"""LIMA decoding against transformers (logits processors, greedy generate) and against itself
(batched vs alone, cache vs full forward, sharded vs single device)."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process


import multi_device
from lima_jax import convert
from lima_jax import model as model_lib
from lima_jax import sampling


# Vocabulary 100 padded to 128: padded entries exist and must never be sampled.
CFG = model_lib.ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            mlp_dim=64, vocab_pad_multiple=128, rope_theta=10000.0, max_seq_len=256)
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [1, 2, 3],
           [1, 40, 41]]


def greedy_config(**kw):
  fields = dict(greedy=True, repetition_penalty=1.0, max_new_tokens=10, max_len=64, batch_size=8)
  fields.update(kw)
  return sampling.SamplingConfig(**fields)


def tiny_hf_model(cfg: model_lib.ModelConfig, seed: int = 0):
  torch.manual_seed(seed)
  hf_config = transformers.LlamaConfig(**convert.model_config_to_hf_config(
      cfg.replace(max_seq_len=256), dtype="float32", special_tokens={"bos_token_id": 1, "pad_token_id": 0}))
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # Larger weights than the default init, so answers are not constant.
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0.0, 0.3)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


@pytest.fixture(scope="module")
def hf_and_params(tmp_path_factory):
  """The reference model and our parameters for it, through the project's converter."""
  hf = tiny_hf_model(CFG)
  hf_dir = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(hf_dir, safe_serialization=True)
  params, config = convert.load_hf_params(hf_dir)
  assert config.replace(param_dtype="float32") == CFG
  return hf, params


# --- logits processors vs transformers -------------------------------------------------------


def _random_scores(seed=0, batch=4, vocab=100):
  rng = np.random.default_rng(seed)
  scores = rng.normal(0.0, 3.0, size=(batch, vocab)).astype(np.float32)
  ids = rng.integers(0, vocab, size=(batch, 12))
  return scores, ids


@pytest.mark.parametrize("penalty", [1.2, 0.8])
def test_repetition_penalty_matches_transformers(penalty):
  scores, ids = _random_scores()
  want = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(scores))
  seen = sampling.token_presence(jnp.asarray(ids), jnp.ones(ids.shape, bool), scores.shape[1])
  got = sampling.apply_repetition_penalty(jnp.asarray(scores), seen, penalty)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
  assert not np.allclose(np.asarray(got), scores)


def test_token_presence_ignores_invalid_positions():
  tokens = jnp.array([[3, 4, 5], [6, 7, 8]])
  valid = jnp.array([[True, True, False], [False, False, False]])
  seen = np.asarray(sampling.token_presence(tokens, valid, 10))
  assert seen[0].nonzero()[0].tolist() == [3, 4]
  assert not seen[1].any()


def test_temperature_matches_transformers():
  scores, ids = _random_scores(1)
  want = logits_process.TemperatureLogitsWarper(0.7)(torch.tensor(ids), torch.tensor(scores))
  got = sampling.apply_temperature(jnp.asarray(scores), 0.7)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("top_p,keep", [(0.9, 1), (0.5, 1), (0.05, 1), (0.3, 5), (0.999, 1)])
def test_top_p_matches_transformers(top_p, keep):
  scores, ids = _random_scores(2, batch=6)
  want = logits_process.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(
      torch.tensor(ids), torch.tensor(scores)).numpy()
  got = np.asarray(sampling.top_p_filter(jnp.asarray(scores), top_p, keep))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])
  assert np.isfinite(got).sum(axis=1).min() >= keep


def test_processing_chain_matches_transformers_order():
  scores, ids = _random_scores(3)
  procs = logits_process.LogitsProcessorList([
      logits_process.RepetitionPenaltyLogitsProcessor(1.2), logits_process.TemperatureLogitsWarper(0.7),
      logits_process.TopPLogitsWarper(0.9)])
  want = procs(torch.tensor(ids), torch.tensor(scores)).numpy()
  config = sampling.SamplingConfig()
  seen = sampling.token_presence(jnp.asarray(ids), jnp.ones(ids.shape, bool), 100)
  got = np.asarray(sampling.process_logits(jnp.asarray(scores), seen, config, vocab_size=100))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_padded_vocabulary_is_never_chosen():
  logits = jnp.zeros((3, 128)).at[:, 100:].set(50.0)  # Padded entries as likely as can be.
  seen = jnp.zeros((3, 128), bool)
  for greedy in (True, False):
    config = sampling.SamplingConfig(greedy=greedy, top_p=1.0, temperature=1.0)
    processed = sampling.process_logits(logits, seen, config, vocab_size=100)
    keys = jax.random.split(jax.random.key(0), 3)
    assert int(sampling.choose_tokens(processed, keys, greedy).max()) < 100


def test_rows_past_the_tokenizer_are_never_sampled():
  """An embedding with rows past its tokenizer (as Qwen's), those rows made the most likely: the
  model narrowed once by `without_padding_rows` never answers with them, and drops the rows its
  new padded size no longer needs."""
  cfg = CFG.replace(vocab_pad_multiple=16)  # 100 ids, 112 rows; a tokenizer of 60 ids -> 64 rows.
  params = model_lib.init_params(cfg, jax.random.key(0))
  params["lm_head"] = params["lm_head"].at[:, 60:100].set(5.0)
  small, cut = sampling.without_padding_rows(cfg, params, 60)
  assert small.vocab_size == 60 and cut["lm_head"].shape[1] == cut["embed"]["embedding"].shape[0] == 64
  for config in (greedy_config(), greedy_config(greedy=False, temperature=1.0, top_p=1.0)):
    results = sampling.generate(small, cut, PROMPTS, sampling_config=config, stop_ids=())
    assert all(r.tokens and max(r.tokens) < 60 for r in results)
  full = sampling.generate(cfg, params, PROMPTS[:1], sampling_config=greedy_config(), stop_ids=())
  assert max(full[0].tokens) >= 60  # The rows do win when nothing narrows the model.
  same_cfg, same_params = sampling.without_padding_rows(cfg, params, 100)  # Covers the model.
  assert same_cfg is cfg and same_params is params


# --- generation ------------------------------------------------------------------------------


def test_greedy_equals_transformers_generate(hf_and_params):
  hf, params = hf_and_params
  config = greedy_config()
  ours = sampling.generate(CFG, params, PROMPTS, sampling_config=config, stop_ids=(), pad_id=0)
  for prompt, result in zip(PROMPTS, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10)
    assert result.tokens == out[0, len(prompt):].tolist()
    assert result.finish_reason == "length" and result.response_tokens == 10
  assert len({tuple(r.tokens) for r in ours}) > 1


@pytest.mark.slow
def test_greedy_with_penalty_on_prompt_equals_transformers(hf_and_params):
  """penalty_scope="all" is transformers' repetition penalty (prompt + generated tokens)."""
  hf, params = hf_and_params
  config = greedy_config(repetition_penalty=1.2, penalty_scope="all")
  ours = sampling.generate(CFG, params, PROMPTS[:3], sampling_config=config, stop_ids=(), pad_id=0)
  generated_only = sampling.generate(CFG, params, PROMPTS[:3], sampling_config=config.replace(
      penalty_scope="generated"), stop_ids=(), pad_id=0)
  for prompt, result in zip(PROMPTS, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                        repetition_penalty=1.2)
    assert result.tokens == out[0, len(prompt):].tolist()
  assert [r.tokens for r in ours] != [r.tokens for r in generated_only]


@pytest.mark.slow
def test_stacked_and_per_layer_cpu_decoding_agree(hf_and_params, monkeypatch):
  """With too little free memory for per-layer copies, generate reads the stacked arrays: same
  answers, greedy and sampled."""
  _, params = hf_and_params
  config = greedy_config(batch_size=2, max_new_tokens=12)
  sampled = config.replace(greedy=False, repetition_penalty=1.2, seed=3)
  per_layer = [sampling.generate(CFG, params, PROMPTS[:3], sampling_config=c, stop_ids=(), pad_id=0)
               for c in (config, sampled)]
  sampling._cached_decode_fns.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(sampling, "per_layer_copies", lambda params: False)
  stacked = [sampling.generate(CFG, params, PROMPTS[:3], sampling_config=c, stop_ids=(), pad_id=0)
             for c in (config, sampled)]
  sampling._cached_decode_fns.cache_clear()  # pylint: disable=protected-access
  for a, b in zip(per_layer, stacked):
    assert [r.tokens for r in a] == [r.tokens for r in b]


@pytest.mark.slow
def test_batched_equals_alone(hf_and_params):
  _, params = hf_and_params
  # 5 prompts: a full batch and one with an unused row. 16 new tokens put every batch in the same
  # cache bucket (32), so this test compiles only one program per batch size and mode.
  config = greedy_config(batch_size=3, max_new_tokens=16)
  batched = sampling.generate(CFG, params, PROMPTS, sampling_config=config, stop_ids=(), pad_id=0)
  alone = [sampling.generate(CFG, params, [p], sampling_config=config.replace(batch_size=1),
                             stop_ids=(), pad_id=0)[0] for p in PROMPTS[:3]]
  assert [r.tokens for r in batched[:3]] == [r.tokens for r in alone]
  # Sampling too: each prompt draws from its own key, whatever shares its batch.
  sampled = config.replace(greedy=False, repetition_penalty=1.2, seed=7)
  a = sampling.generate(CFG, params, PROMPTS, sampling_config=sampled, stop_ids=(), pad_id=0,
                        prompt_seeds=[10, 11, 12, 13, 14])
  b = sampling.generate(CFG, params, PROMPTS[::-1], sampling_config=sampled, stop_ids=(), pad_id=0,
                        prompt_seeds=[14, 13, 12, 11, 10])
  assert [r.tokens for r in a] == [r.tokens for r in b[::-1]]
  c = sampling.generate(CFG, params, PROMPTS, sampling_config=sampled.replace(seed=8), stop_ids=(),
                        pad_id=0, prompt_seeds=[10, 11, 12, 13, 14])
  assert [r.tokens for r in a] != [r.tokens for r in c]


@pytest.mark.slow
def test_stops_at_stop_id(hf_and_params):
  _, params = hf_and_params
  config = greedy_config(max_new_tokens=10)
  free = sampling.generate(CFG, params, PROMPTS[:1], sampling_config=config, stop_ids=(), pad_id=0)[0]
  stop = free.tokens[3]
  first = free.tokens.index(stop)
  result = sampling.generate(CFG, params, PROMPTS[:1], sampling_config=config, stop_ids=(99, stop),
                             pad_id=0)[0]
  assert result.tokens == free.tokens[:first]
  assert result.finish_reason == "stop" and result.generated_tokens == first + 1


def test_context_limit_and_left_truncation_keep_bos(hf_and_params):
  _, params = hf_and_params
  assert sampling.truncate_prompt([1, 2, 3, 4, 5, 6], 4, bos_id=1) == [1, 4, 5, 6]
  assert sampling.truncate_prompt([7, 2, 3, 4, 5, 6], 4, bos_id=1) == [3, 4, 5, 6]
  config = greedy_config(max_len=24, max_new_tokens=10)  # Room for 24 - min(10, 6) = 18 prompt tokens.
  long_prompt = [1] + list(range(20, 60))
  result = sampling.generate(CFG, params, [long_prompt], sampling_config=config, stop_ids=(), pad_id=0,
                             bos_id=1)[0]
  assert result.prompt_truncated and result.prompt_tokens == 18
  assert result.response_tokens == 6 and result.finish_reason == "max_len"
  kept = sampling.truncate_prompt(long_prompt, 18, bos_id=1)
  same = sampling.generate(CFG, params, [kept], sampling_config=config, stop_ids=(), pad_id=0)[0]
  assert same.tokens == result.tokens and not same.prompt_truncated


@pytest.mark.slow
def test_cache_decoding_equals_full_forward(hf_and_params):
  """Per-token logits of prefill + decode steps equal one forward over the whole sequence."""
  _, params = hf_and_params
  sequences = np.array([[1, 5, 6, 7, 8, 9, 10, 11], [1, 9, 30, 31, 32, 33, 34, 35]], np.int32)
  full = np.asarray(model_lib.bind(CFG, params)(jnp.asarray(sequences), padded_vocab=True))
  fns = sampling.make_decode_fns(CFG, greedy_config(), None, batch_size=2, cache_len=16)
  cache = fns.prefill(params, jnp.asarray(sequences[:, :3]), model_lib.init_cache(CFG, 2, 16))
  for pos in range(3, sequences.shape[1]):
    logits, cache = fns.decode_step(params, jnp.asarray(sequences[:, pos]),
                                    jnp.full((2,), pos, jnp.int32), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, :100], full[:, pos, :100], rtol=2e-5, atol=2e-5)


def test_bad_inputs(hf_and_params):
  _, params = hf_and_params
  config = greedy_config()
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampling.generate(CFG, params, [[1], []], sampling_config=config, stop_ids=())
  with pytest.raises(ValueError, match="token id 100 is outside"):
    sampling.generate(CFG, params, [[1, 100]], sampling_config=config, stop_ids=())
  with pytest.raises(ValueError, match="penalty_scope"):
    sampling.SamplingConfig(penalty_scope="prompt")
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplingConfig(temperature=0.0)
  with pytest.raises(ValueError, match="unknown field"):
    sampling.SamplingConfig.from_dict({"top_k": 5})


@pytest.mark.slow
def test_sharded_generation_equals_single_device(tmp_path):
  """On an 8-device mesh (fsdp 4 x tensor 2) sampled answers equal those of one device."""
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from lima_jax import model as model_lib, sampling, sharding
      cfg = model_lib.ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64)
      params = jax.tree.map(lambda x: x * 15.0, model_lib.init_params(cfg, jax.random.key(3)))
      prompts = {PROMPTS[:4]!r}
      config = sampling.SamplingConfig(max_new_tokens=8, max_len=64, batch_size=4)
      mesh = sharding.make_mesh(dict(data=1, fsdp=4, sequence=1, tensor=2))
      sharded = sampling.generate(cfg, params, prompts, sampling_config=config, stop_ids=(), mesh=mesh)
      single = sampling.generate(cfg, params, prompts, sampling_config=config, stop_ids=())
      assert [r.tokens for r in sharded] == [r.tokens for r in single], (sharded, single)
      assert len(set(tuple(r.tokens) for r in single)) > 1
      print("ok", len(jax.devices()))
  """)
  multi_device.run_on_8_cpu_devices(script)
