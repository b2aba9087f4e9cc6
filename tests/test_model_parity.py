"""lima_jax's LLaMA against transformers' LlamaForCausalLM, and the model's own invariants.

The reference is PyTorch on CPU with random tiny configs (tests/llama_reference.py). Everything
else here (scan vs unrolled, remat, KV cache, dropout, vocabulary padding) compares lima_jax
with itself on the same weights.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_reference as ref
from lima_jax import convert
from lima_jax import model as model_lib


def _forward(config, params, tokens, **kwargs):
  return np.asarray(jax.jit(lambda p, t: model_lib.bind(config, p)(t, **kwargs))(params, tokens))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """style -> (torch model, directory): LLaMA-1 with 4.x keys and no num_key_value_heads,
  LLaMA-2 with 4.x keys, LLaMA-3 with 5.x keys, sharded."""
  out = {}
  for style, keys, shard in (("llama1", "4.x", None), ("llama2", "4.x", None),
                             ("llama3", "5.x", "60KB")):
    model = ref.make_model(style)
    directory = ref.save_model(model, tmp_path_factory.mktemp(style) / "hf", keys=keys,
                               max_shard_size=shard)
    out[style] = (model, directory)
  return out


@pytest.mark.parametrize("style", sorted(ref.STYLES))
def test_logits_match_transformers(hf_models, style):
  torch_model, directory = hf_models[style]
  config_json = json.loads((directory / "config.json").read_text())
  if style == "llama1":
    assert "num_key_value_heads" not in config_json and "rope_theta" in config_json
  if style == "llama3":
    assert "rope_parameters" in config_json and (directory / convert.INDEX_FILE).is_file()
  model = convert.load_pretrained(directory)
  tokens = ref.tokens()
  logits = np.asarray(model(jnp.asarray(tokens)))
  want = ref.torch_logits(torch_model, tokens)
  assert logits.dtype == np.float32 and logits.shape == want.shape == (2, 24, 300)
  assert ref.relative_error(logits, want) < 1e-5
  assert model.config.kv_heads == torch_model.config.num_key_value_heads
  assert model.config.tie_embeddings == (style == "llama3")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load(tmp_path, dtype):
  torch_model = ref.make_model("llama2")
  directory = ref.save_model(torch_model, tmp_path / "hf", keys="4.x", dtype=dtype)
  declared = json.loads((directory / "config.json").read_text())["torch_dtype"]
  assert declared == str(dtype).removeprefix("torch.")
  tokens = ref.tokens()
  want = ref.torch_logits(ref.rounded(torch_model, dtype), tokens)
  logits = np.asarray(convert.load_pretrained(directory)(jnp.asarray(tokens)))
  assert ref.relative_error(logits, want) < 1e-5
  low = convert.load_pretrained(directory, dtype="bfloat16")
  assert low.embed["embedding"][...].dtype == jnp.bfloat16
  low_logits = np.asarray(low(jnp.asarray(tokens)))
  assert low_logits.dtype == np.float32 and ref.relative_error(low_logits, want) < 5e-2


@pytest.fixture(scope="module")
def small():
  config = model_lib.ModelConfig(vocab_size=300, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                                 mlp_dim=48, rope_theta=500000.0)
  return config, ref.random_params(config)


def test_scan_and_unrolled_agree(small):
  config, params = small
  tokens = ref.tokens(length=16)
  scanned = _forward(config, params, tokens)
  unrolled = _forward(config.replace(scan_layers=False), params, tokens)
  np.testing.assert_allclose(unrolled, scanned, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_remat_policies_give_same_gradients(small):
  config, params = small
  tokens = ref.tokens(length=8)
  policies = [p for p in sorted(model_lib.REMAT_POLICIES) if p != "none"]
  # Every policy scanned, and full remat unrolled too, against no remat; one compile in all.
  configs = [config.replace(remat_policy=p) for p in policies]
  configs.append(config.replace(remat_policy="full", scan_layers=False))

  def loss(p, cfg):
    logits = model_lib.bind(cfg, p)(tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  want, gots = jax.jit(lambda p: (jax.grad(loss)(p, config),
                                  [jax.grad(loss)(p, c) for c in configs]))(params)
  for cfg, got in zip(configs, gots):
    jax.tree.map(lambda g, w, cfg=cfg: np.testing.assert_allclose(
        g, w, rtol=1e-5, atol=1e-7, err_msg=f"{cfg.remat_policy} scan={cfg.scan_layers}"), got, want)


def test_kv_cache_decode_matches_full_forward(small):
  """Right-padded prompts of lengths 5 and 9 in one batch, then one token at a time."""
  config, params = small
  full = ref.tokens(length=14, seed=3)
  want = _forward(config, params, full)
  lengths = np.array([5, 9])
  prompt = np.where(np.arange(9)[None] < lengths[:, None], full[:, :9], 0).astype(np.int32)
  positions = np.broadcast_to(np.arange(9, dtype=np.int32), prompt.shape)
  decode = jax.jit(lambda p, t, pos, c: model_lib.bind(config, p).decode(t, pos, c))
  cache = model_lib.init_cache(config, 2, 16)
  logits, cache = decode(params, prompt, positions, cache)
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(logits[row, :n], want[row, :n], rtol=1e-5, atol=1e-5)
  for step in range(5):
    pos = (lengths + step).astype(np.int32)[:, None]
    token = full[np.arange(2), pos[:, 0]][:, None]
    logits, cache = decode(params, token, pos, cache)
    np.testing.assert_allclose(logits[:, 0], want[np.arange(2), pos[:, 0]], rtol=1e-5, atol=1e-5)


def test_residual_dropout_schedule_and_modes(small):
  config, params = small
  np.testing.assert_allclose(model_lib.residual_dropout_rates(config.replace(
      n_layers=5, residual_dropout=0.3)), [0.3 * i / 4 for i in range(5)], rtol=1e-6)
  assert float(model_lib.residual_dropout_rates(config.replace(n_layers=1))[0]) == 0.0
  config = config.replace(residual_dropout=0.3)
  tokens = ref.tokens(length=8)
  key = jax.random.key(7)

  @jax.jit
  def forwards(p):
    on, off = model_lib.bind(config, p), model_lib.bind(config.replace(residual_dropout=0.0), p)
    return off(tokens), on(tokens), on(tokens, dropout_key=key), off(tokens, dropout_key=key)

  without, evaluation, training, zero_rate = map(np.asarray, forwards(params))
  np.testing.assert_array_equal(evaluation, without)  # No dropout key: deterministic, none.
  assert not np.allclose(training, evaluation, atol=1e-3)
  np.testing.assert_allclose(zero_rate, without, rtol=1e-6, atol=1e-6)
  # The per-layer rate is what each scanned layer applies: about that share of zeros.
  rates = jnp.array([0.0, 0.15, 0.3])
  kept = jax.jit(jax.vmap(lambda r: model_lib._dropout(  # pylint: disable=protected-access
      jnp.ones((64, 64, 64)), r, jax.random.key(0))))(rates)
  np.testing.assert_allclose(jnp.mean(kept == 0, axis=(1, 2, 3)), rates, atol=0.01)
  np.testing.assert_allclose(jnp.mean(kept, axis=(1, 2, 3)), 1.0, atol=0.02)


@pytest.mark.slow
def test_each_scanned_layer_drops_at_its_own_rate(monkeypatch):
  """Through the real scan: layer 0 drops nothing, the top layer drops at the full rate, the
  layers between on LIMA's linear ramp (a reversed or constant ramp fails), in both branches."""
  n_layers, top = 5, 0.3
  config = model_lib.ModelConfig(vocab_size=64, d_model=64, n_layers=n_layers, n_heads=4,
                                 mlp_dim=128, max_seq_len=64, residual_dropout=top, dtype="float32",
                                 scan_layers=True, remat_policy="none")
  params = model_lib.init_params(config, jax.random.key(0))
  zeros = []  # Share of the residual branch dropped, per call, in the order the scan runs them.
  original = model_lib._dropout  # pylint: disable=protected-access

  def recording(x, rate, key):
    out = original(x, rate, key)
    jax.debug.callback(lambda share: zeros.append(float(share)),
                       jnp.mean((out == 0) & (x != 0)), ordered=True)
    return out

  monkeypatch.setattr(model_lib, "_dropout", recording)
  tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, config.vocab_size)
  jax.block_until_ready(model_lib.bind(config, params)(tokens, dropout_key=jax.random.key(2)))
  jax.effects_barrier()
  measured = np.asarray(zeros).reshape(n_layers, 2)  # Bottom layer first; attention, then MLP.
  want = top * np.arange(n_layers) / (n_layers - 1)
  np.testing.assert_allclose(measured, np.repeat(want[:, None], 2, axis=1), atol=0.015)
  assert measured[0].max() == 0.0 and measured[-1].min() > top - 0.015


def test_padded_vocabulary_never_wins(small):
  config, params = small
  assert config.padded_vocab_size == 384
  # Even if padded head columns held huge weights, their logits stay masked.
  head = params["lm_head"].at[:, config.vocab_size:].set(100.0)
  params = {**params, "lm_head": head}
  tokens = ref.tokens(length=8)
  padded = _forward(config, params, tokens, padded_vocab=True)
  assert padded.shape[-1] == 384
  assert (padded.argmax(-1) < config.vocab_size).all()
  assert (padded[..., config.vocab_size:] < -1e30).all()
  assert _forward(config, params, tokens).shape[-1] == config.vocab_size
