"""Mistral, Qwen2/2.5 and Qwen3 against transformers: config reading, logits, packed scoring past
a sliding window, KV-cache greedy decoding, the bit-exact round trip and the export's class.

Each reference is a tiny random `{Mistral,Qwen2,Qwen3}ForCausalLM` built with transformers and
saved with `save_pretrained`; the family differences are all present and non-trivial (random
biases and q/k norm scales, a window shorter than the test sequences).
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import llama_reference as ref
from lima_jax import convert
from lima_jax import model as model_lib
from lima_jax import sampling

WINDOW = 8  # Mistral's sliding window here; the test sequences are 3x longer.
_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6)
FAMILIES = {
    # Mistral v0.1: GQA and a sliding window.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    # Qwen2.5 small: q/k/v biases, tied embeddings, theta 1e6; `sliding_window` is set but
    # `use_sliding_window` is off, as in the released configs: no window.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=False,
                   sliding_window=4, max_window_layers=1)),
    # Qwen3: q/k RMSNorm per head, head_dim 24 != 64 / 4.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=24, tie_word_embeddings=False, rope_theta=1e6)),
}


def make_model(family: str, seed: int = 0, std: float | None = None):
  """A random model of `family`; `std` redraws the matrices larger (greedy answers that vary)."""
  config_cls, model_cls, fields = FAMILIES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**_COMMON, **fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.1)
      elif std is not None and p.dim() > 1:
        p.normal_(0.0, std)
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  out = {}
  for family in FAMILIES:
    model = make_model(family)
    directory = ref.save_model(model, tmp_path_factory.mktemp(family) / "hf")
    out[family] = (model, directory)
  return out


def _forward(config, params, tokens, positions=None, segments=None):
  return np.asarray(jax.jit(lambda p, t, pos, seg: model_lib.bind(config, p)(t, pos, seg))(
      params, tokens, positions, segments))


# -- config.json ----------------------------------------------------------------------------------


def test_family_configs_are_read_as_transformers_reads_them(hf_models):
  got = {f: convert.hf_config_to_model_config(d) for f, (_, d) in hf_models.items()}
  assert (got["mistral"].model_type, got["mistral"].sliding_window, got["mistral"].kv_heads) == (
      "mistral", WINDOW, 2)
  assert not got["mistral"].attention_bias and not got["mistral"].qk_norm
  q2 = got["qwen2"]
  assert (q2.model_type, q2.attention_bias, q2.tie_embeddings, q2.rope_theta, q2.sliding_window) == (
      "qwen2", True, True, 1e6, 0)
  q3 = got["qwen3"]
  assert (q3.model_type, q3.qk_norm, q3.dim_per_head, q3.attention_bias) == ("qwen3", True, 24, False)
  # Fields transformers fills in when config.json leaves them out.
  bare = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4}
  assert convert.hf_config_to_model_config({**bare, "model_type": "qwen3"}).dim_per_head == 128
  assert convert.hf_config_to_model_config({**bare, "model_type": "mistral"}).sliding_window == 4096
  assert convert.hf_config_to_model_config(
      {**bare, "model_type": "mistral", "sliding_window": None}).sliding_window == 0
  # Qwen2 with the window on and no layer below max_window_layers: every layer slides.
  assert convert.hf_config_to_model_config(
      {**bare, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
       "max_window_layers": 0}).sliding_window == 16
  assert convert.hf_config_to_model_config(
      {**bare, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
       "max_window_layers": 2}).sliding_window == 0


_BARE = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4}


@pytest.mark.parametrize("fields, field", [
    ({"model_type": "gemma"}, "model_type"),
    ({"model_type": "qwen2", "architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
      "max_window_layers": 1}, "some layers only"),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"],
      "use_sliding_window": True}, "layer_types"),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen2", "num_experts": 8}, "num_experts"),
    ({"model_type": "mistral", "num_local_experts": 8}, "num_local_experts"),
    ({"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"model_type": "mistral", "mlp_bias": True}, "mlp_bias"),
])
def test_what_is_not_implemented_is_refused_by_name(fields, field):
  with pytest.raises(convert.ConversionError, match=field):
    convert.hf_config_to_model_config({**_BARE, **fields})


# -- Logits, scoring, decoding --------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(hf_models, family):
  torch_model, directory = hf_models[family]
  model = convert.load_pretrained(directory)
  tokens = ref.tokens()  # 24 tokens: three Mistral windows.
  logits = np.asarray(model(jnp.asarray(tokens)))
  want = ref.torch_logits(torch_model, tokens)
  assert logits.dtype == np.float32 and logits.shape == want.shape == (2, 24, 300)
  assert ref.relative_error(logits, want) < 1e-5
  if family == "mistral":  # The window matters at this length: without it, the logits differ.
    params, config = convert.load_hf_params(directory)
    full = _forward(config.replace(sliding_window=0), params, tokens)
    assert ref.relative_error(full, want) > 1e-3


def test_mistral_packed_scoring_past_the_window_matches_transformers(hf_models):
  """Two conversations packed in one row, each longer than the window (the training and
  evaluation batches' layout): each token's log-likelihood is transformers' for its own text."""
  torch_model, directory = hf_models["mistral"]
  params, config = convert.load_hf_params(directory)
  a, b = ref.tokens(1, 20, seed=1)[0], ref.tokens(1, 14, seed=2)[0]
  packed = np.concatenate([a, b, np.zeros(6, np.int32)])[None]
  segments = np.array([[1] * 20 + [2] * 14 + [0] * 6], np.int32)
  positions = np.array([list(range(20)) + list(range(14)) + list(range(6))], np.int32)
  logits = _forward(config, params, packed, positions, segments)
  for seg, text in ((1, a), (2, b)):
    want = ref.torch_logits(torch_model, text[None])[0]
    got = logits[0, segments[0] == seg]
    assert ref.relative_error(got, want) < 1e-5
    score = lambda x: np.take_along_axis(jax.nn.log_softmax(x), text[1:, None], -1)[:, 0]
    np.testing.assert_allclose(score(got[:-1]), score(want[:-1]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mistral_greedy_decoding_past_the_window_equals_transformers(tmp_path):
  """Prompts shorter and longer than the window, 20 new tokens: the cache path masks by window."""
  torch_model = make_model("mistral", seed=3, std=0.3)
  torch_model.generation_config.eos_token_id = None
  torch_model.generation_config.pad_token_id = 0
  directory = ref.save_model(torch_model, tmp_path / "hf")
  params, config = convert.load_hf_params(directory)
  prompts = [[1, 5, 6, 7], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
  scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=20, max_len=64,
                                 batch_size=2)
  ours = sampling.generate(config, params, prompts, sampling_config=scfg, stop_ids=(), pad_id=0)
  for prompt, result in zip(prompts, ours):
    with torch.no_grad():
      out = torch_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                                 min_new_tokens=20)
    assert result.tokens == out[0, len(prompt):].tolist()
  assert len(set(ours[1].tokens)) > 1
  # Without the window the answers differ: the test reaches past it.
  unwindowed = sampling.generate(config.replace(sliding_window=0), params, prompts,
                                 sampling_config=scfg, stop_ids=(), pad_id=0)
  assert [r.tokens for r in unwindowed] != [r.tokens for r in ours]


# -- Round trip and export ------------------------------------------------------------------------


def _tensors(directory):
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(safetensors.torch.load_file(f))
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_exact_and_exports_the_family_class(hf_models, tmp_path, family):
  torch_model, directory = hf_models[family]
  convert.hf_to_orbax(directory, tmp_path / "ckpt")
  convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="40KB")
  original, back = _tensors(directory), _tensors(tmp_path / "back")
  assert sorted(original) == sorted(back)
  for name, tensor in original.items():
    assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
  hf_config = json.loads((tmp_path / "back" / "config.json").read_text())
  assert hf_config["model_type"] == family
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  assert type(reloaded) is type(torch_model)
  for key in ("sliding_window", "tie_word_embeddings", "num_key_value_heads", "layer_types"):
    assert getattr(reloaded.config, key, None) == getattr(torch_model.config, key, None), key
  head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  assert head_dim(reloaded.config) == head_dim(torch_model.config)
  tokens = ref.tokens()
  np.testing.assert_array_equal(ref.torch_logits(reloaded, tokens), ref.torch_logits(torch_model, tokens))
  assert convert.hf_config_to_model_config(tmp_path / "back") == convert.hf_config_to_model_config(directory)


def test_a_config_the_family_cannot_express_is_not_exported():
  config = model_lib.ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, mlp_dim=96,
                                 model_type="llama", sliding_window=8)
  with pytest.raises(convert.ConversionError, match="sliding_window"):
    convert.model_config_to_hf_config(config, dtype="float32")
  with pytest.raises(convert.ConversionError, match="attention_bias"):
    convert.model_config_to_hf_config(config.replace(model_type="qwen2", sliding_window=0),
                                      dtype="float32")


# -- Tokenizers: EOT, BOS, EOS and pad per family --------------------------------------------------

# Each family's special tokens and tokenizer_config.json as their releases ship them (ids shrunk):
# Llama-3 appends its specials after the BPE vocabulary and adds BOS in a post-processor; Qwen2.5
# declares `bos_token: null` and has no BOS at all; Mistral v3 puts <unk>, <s>, </s> first.
TOKENIZER_FAMILIES = {
    "llama3": dict(first=[], last=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                   "<|finetune_right_pad_id|>"], bos="<|begin_of_text|>",
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
                   want=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")),
    "qwen2.5": dict(first=[], last=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                    config={"bos_token": None, "eos_token": "<|im_end|>",
                            "pad_token": "<|endoftext|>", "unk_token": None},
                    want=(None, "<|im_end|>", "<|endoftext|>")),
    "mistral-v3": dict(first=["<unk>", "<s>", "</s>"], last=["[INST]", "[/INST]"], bos="<s>",
                       config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                       want=("<s>", "</s>", "</s>")),  # No pad token: pad falls back to EOS.
}
_CORPUS = ["hello world, the quick brown fox jumps over the lazy dog"] * 20


def _family_tokenizer_dir(directory, family):
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  spec = TOKENIZER_FAMILIES[family]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=spec["first"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS, trainer)
  tok.add_special_tokens(spec["last"])
  if spec["bos"]:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec['bos']} $A", special_tokens=[(spec["bos"], tok.token_to_id(spec["bos"]))])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  directory.mkdir(parents=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(spec["config"]))
  return directory


@pytest.mark.parametrize("family", sorted(TOKENIZER_FAMILIES))
def test_tokenizer_json_families_lay_out_conversations_as_lima(tmp_path, family):
  from lima_jax import data  # pylint: disable=g-import-not-at-top
  from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  directory = _family_tokenizer_dir(tmp_path / "tok", family)
  tok = tokenizer_lib.load_tokenizer(directory)
  raw = json.loads((directory / "tokenizer.json").read_text())
  ids = {**raw["model"]["vocab"], **{t["content"]: t["id"] for t in raw["added_tokens"]}}
  want_bos, want_eos, want_pad = (None if n is None else ids[n] for n in TOKENIZER_FAMILIES[family]["want"])
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (want_bos, want_eos, want_pad)
  assert tok.eot_id == tok.base_vocab_size == max(ids.values()) + 1
  # Text never yields a special id, whatever it spells.
  specials = {i for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) if i is not None}
  specials |= {ids[n] for n in TOKENIZER_FAMILIES[family]["first"] + TOKENIZER_FAMILIES[family]["last"]}
  text = " ".join(["<EOT>", *TOKENIZER_FAMILIES[family]["last"], *TOKENIZER_FAMILIES[family]["first"]])
  assert not set(tok.encode(text)) & specials
  assert tok.decode(tok.encode(text)) == text
  # LIMA's layout: [BOS where the family has one] turn EOT turn EOT.
  tokens, mask = data.tokenize_conversation(tok, ["hello world", "the lazy dog"])
  lead = [] if want_bos is None else [want_bos]
  want = lead + tok.encode("hello world") + [tok.eot_id] + tok.encode("the lazy dog") + [tok.eot_id]
  assert tokens.tolist() == want
  assert mask.tolist() == [False] * (len(lead) + len(tok.encode("hello world")) + 1) + [True] * (
      len(tok.encode("the lazy dog")) + 1)
  # The export keeps the ids (and Qwen's missing BOS), and transformers reads EOT as one token.
  tok.save_files(tmp_path / "export")
  again = tokenizer_lib.load_tokenizer(tmp_path / "export")
  assert (again.bos_id, again.eos_id, again.pad_id, again.eot_id) == (
      tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id)
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
  assert hf.convert_tokens_to_ids("<EOT>") == tok.eot_id
  assert hf.bos_token_id == tok.bos_id


def test_a_declared_special_token_missing_from_the_vocabulary_is_an_error(tmp_path):
  from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  directory = _family_tokenizer_dir(tmp_path / "tok", "qwen2.5")
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match=r"tokenizer_config\.json.*eos_token"):
    tokenizer_lib.load_tokenizer(directory)


# -- Starting from, answering with and compiling a family checkpoint -------------------------------


def _qwen2_base_dir(directory, tok_dir, **config_fields):
  """A Qwen2.5-like base model: an embedding larger than its tokenizer (spare rows), biases,
  tied embeddings, the tokenizer files beside it."""
  import shutil  # pylint: disable=g-import-not-at-top
  from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  torch.manual_seed(0)
  fields = dict(vocab_size=tok.base_vocab_size + 20, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1e6,
                eos_token_id=tok.eos_id, bos_token_id=None)
  fields.update(config_fields)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.normal_(0.0, 0.1)
      elif p.dim() > 1:
        p.normal_(0.0, 0.3)
  model.save_pretrained(directory, safe_serialization=True)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok_dir / name, directory / name)
  return model, tok


class _MaskFrom(transformers.LogitsProcessor):
  def __init__(self, start):
    self.start = start

  def __call__(self, input_ids, scores):
    scores[:, self.start:] = -float("inf")
    return scores


def test_evaluate_answers_with_a_qwen2_base_model_as_transformers_does(tmp_path):
  """No BOS, a spare untrained EOT row: prompts are plain text, answers stop at EOS only."""
  from lima_jax.cli import evaluate  # pylint: disable=g-import-not-at-top
  tok_dir = _family_tokenizer_dir(tmp_path / "tok", "qwen2.5")
  hf, tok = _qwen2_base_dir(tmp_path / "hf", tok_dir)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "the quick brown fox", "id": "p1"}) + "\n")
  logs = []
  scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=8, max_len=64,
                                 batch_size=1)
  records = evaluate.evaluate(str(tmp_path / "hf"), str(prompts), str(tmp_path / "out.jsonl"),
                              sampling_config=scfg, log=logs.append)
  assert any("spare, untrained row for EOT" in line for line in logs), logs
  assert any(f"stop ids [{tok.eos_id}]" in line for line in logs), logs
  ids = tok.encode("the quick brown fox")  # No BOS.
  assert records[0]["prompt_tokens"] == len(ids)
  # transformers' answer with the rows no token uses masked out, as lima_jax samples.
  spare = transformers.LogitsProcessorList([_MaskFrom(tok.vocab_size)])
  with torch.no_grad():
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, pad_token_id=0,
                      logits_processor=spare)
  want = out[0, len(ids):].tolist()
  if want and want[-1] == tok.eos_id:
    want = want[:-1]
  assert records[0]["response"] == tok.decode(want)


@pytest.mark.slow
def test_train_cli_fine_tunes_a_qwen2_checkpoint_with_a_window_and_exports_it(tmp_path):
  """`python -m lima_jax.train --config.model.init_from=<Qwen2 dir>`: biases, tied embeddings, a
  window on every layer, EOT at a spare row set to the mean of the token rows; then export."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from lima_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lima_jax import sharding  # pylint: disable=g-import-not-at-top
  from lima_jax import train  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parent.parent
  tok_dir = _family_tokenizer_dir(tmp_path / "tok", "qwen2.5")
  hf, tok = _qwen2_base_dir(tmp_path / "hf", tok_dir, use_sliding_window=True, sliding_window=16,
                            max_window_layers=0)
  # In process: the loaded weights, EOT's row at the mean.
  from configs import lima  # pylint: disable=g-import-not-at-top
  config = lima.get_config("tiny")
  config.model.init_from = str(tmp_path / "hf")
  config.data.max_len = 64  # Within the model's 256 positions (RoPE is not extrapolated).
  config.mesh.update(dict(data=1, fsdp=1, sequence=1, tensor=1))
  run_tok = train.load_run_tokenizer(config)
  model_config = train.build_model_config(config, run_tok)
  assert (model_config.model_type, model_config.sliding_window, model_config.vocab_size) == (
      "qwen2", 16, tok.base_vocab_size + 20)
  params = train.load_pretrained_params(config, model_config, sharding.make_mesh(
      config.mesh, jax.devices()[:1]), run_tok)
  embed = np.asarray(params["embed"]["embedding"])
  hf_embed = hf.state_dict()["model.embed_tokens.weight"].numpy()
  np.testing.assert_allclose(embed[tok.eot_id], hf_embed[:tok.base_vocab_size].mean(0), rtol=1e-5,
                             atol=1e-7)
  rows = np.arange(len(hf_embed)) != tok.eot_id
  np.testing.assert_array_equal(embed[:len(hf_embed)][rows], hf_embed[rows])
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["k_bias"])[1].reshape(-1),
                                hf.state_dict()["model.layers.1.self_attn.k_proj.bias"].numpy())
  # The CLI: two steps on the bundled sample, then export as Qwen2ForCausalLM.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
  proc = subprocess.run(
      [sys.executable, "-m", "lima_jax.train", f"--workdir={tmp_path / 'wd'}",
       "--config=configs/lima.py:tiny", f"--config.model.init_from={tmp_path / 'hf'}",
       "--config.train.max_steps=2", "--config.train.batch_size=4", "--config.data.max_len=64",
       "--config.train.dev_generations=0", "--config.train.peak_flops_per_device=1e11"],
      env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = [json.loads(line)["loss"] for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
  assert len(losses) == 2 and all(np.isfinite(losses))
  saved = checkpoint.read_model_config(tmp_path / "wd")
  assert (saved.model_type, saved.attention_bias, saved.sliding_window) == ("qwen2", True, 16)
  convert.orbax_to_hf(tmp_path / "wd", tmp_path / "export")
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
  assert type(exported) is transformers.Qwen2ForCausalLM
  assert exported.config.sliding_window == 16 and set(exported.config.layer_types) == {"sliding_attention"}
  tokens = ref.tokens(vocab=tok.base_vocab_size)
  got = np.asarray(convert.load_pretrained(tmp_path / "wd")(jnp.asarray(tokens)))
  assert ref.relative_error(got, ref.torch_logits(exported, tokens)) < 1e-5
