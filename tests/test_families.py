"""Mistral, Qwen2/2.5 and Qwen3 against transformers: config reading, logits, packed scoring past
a sliding window, KV-cache greedy decoding, the bit-exact round trip and the export's class.

Each reference is a tiny random `{Mistral,Qwen2,Qwen3}ForCausalLM` built with transformers and
saved with `save_pretrained`; the family differences are all present and non-trivial (random
biases and q/k norm scales, a window shorter than the test sequences).
"""

import json

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
