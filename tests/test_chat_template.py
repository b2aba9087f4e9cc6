"""The export's chat template: transformers' apply_chat_template gives lima_jax's ids and loss mask,
a chat pipeline answers as tools/evaluate.py does, generation_config stops at EOT."""

import json
import warnings

import jax
import jinja2
import pytest
import torch
import transformers

import llama_reference as ref
import tiny_models
from lima_jax import checkpoint
from lima_jax import convert
from lima_jax import data
from lima_jax import model as model_lib
from lima_jax import sampling
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.cli import evaluate


# Single- and multi-turn, and the text where SentencePiece's dummy prefix and byte fallback
# matter: leading / repeated spaces, newlines, tabs, empty turns, characters outside the vocab.
CONVERSATIONS = [
    ["Hello world"],
    ["Hi there!", "Hello, how can I help?", "Tell me a joke."],
    [" leading space", "  two spaces", "trailing \n"],
    ["a\n\nb", "x", "日本語 ☃ \t tab"],
    [""],
    ["x", "", "y"],
    ["  ", " ", "\n"],
]


def _sample_conversations():
  out = []
  for split in ("train", "dev"):
    with open(data.bundled_paths()[split], encoding="utf-8") as f:
      for line in f:
        turns = json.loads(line)["conversations"]
        out.append(turns[:len(turns) - 1 + len(turns) % 2])
  return out


def _messages(turns):
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _bpe_dir(directory, *, instruct=False):
  """A tiny LLaMA-3-like byte-level BPE tokenizer.json (BOS <|begin_of_text|> from a
  post-processor); `instruct` adds what an instruct model ships: its own chat template and
  extra special tokens in tokenizer_config.json."""
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  specials = ["<|begin_of_text|>", "<|end_of_text|>"]
  if instruct:
    specials += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
  tok = tiny_models.byte_level_bpe("hello world, the quick brown fox jumps over the lazy dog", specials)
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A",
      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
  directory.mkdir(parents=True)
  tok.save(str(directory / "tokenizer.json"))
  if instruct:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "model_max_length": 8192,
              "chat_template": "{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                               "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return directory


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """(lima_jax tokenizer, transformers tokenizer of its export) for SentencePiece and BPE."""
  root = tmp_path_factory.mktemp("exports")
  out = {}
  sources = {"sentencepiece": data.bundled_paths()["tokenizer"], "bpe": _bpe_dir(root / "bpe_src"),
             "bpe_instruct": _bpe_dir(root / "instruct_src", instruct=True)}
  for name, source in sources.items():
    tok = tokenizer_lib.load_tokenizer(source)
    tok.save_files(root / name)
    out[name] = (tok, transformers.AutoTokenizer.from_pretrained(str(root / name)))
  return out


def _ids(encoded):
  return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe", "bpe_instruct"])
def test_generation_prompt_ids_equal_tokenize_prompt(exports, kind):
  tok, hf = exports[kind]
  conversations = CONVERSATIONS + (_sample_conversations() if kind == "sentencepiece" else [])
  for turns in conversations:
    got = _ids(hf.apply_chat_template(_messages(turns), add_generation_prompt=True, tokenize=True))
    assert got == data.tokenize_prompt(tok, turns).tolist(), turns
    # The rendered text tokenizes to the same ids in one go (what vLLM's server does).
    text = hf.apply_chat_template(_messages(turns), add_generation_prompt=True, tokenize=False)
    assert hf(text, add_special_tokens=False)["input_ids"] == got


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_assistant_mask_is_lima_loss_mask(exports, kind):
  """TRL's assistant-only loss reads this mask: it must cover what lima_jax trains on."""
  tok, hf = exports[kind]
  for turns in (["Hi there!", "Hello, how can I help?"],
                ["Hi there!", "Hello, how can I help?", "Tell me a joke.", "No."]):
    out = hf.apply_chat_template(_messages(turns), tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    tokens, mask = data.tokenize_conversation(tok, turns)
    assert list(out["input_ids"]) == tokens.tolist()
    assert list(out["assistant_masks"]) == mask.astype(int).tolist()


def test_system_message_and_wrong_order_are_refused(exports):
  _, hf = exports["sentencepiece"]
  system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  with pytest.raises(jinja2.TemplateError, match="trained without a system prompt"):
    hf.apply_chat_template(system, add_generation_prompt=True)
  twice = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}]
  with pytest.raises(jinja2.TemplateError, match="message 1 has role user"):
    hf.apply_chat_template(twice, add_generation_prompt=True)


def test_instruct_tokenizer_template_is_replaced(exports, tmp_path):
  tok, hf = exports["bpe_instruct"]
  assert "<|start_header_id|>" not in hf.chat_template and "<EOT>" in hf.chat_template
  # The instruct model's own specials stay special in transformers and keep their ids.
  assert hf.convert_tokens_to_ids("<|eot_id|>") == tok.eos_id
  # Its export loads back in lima_jax with the same ids (and exports identically again).
  tok.save_files(tmp_path / "first")
  reloaded = tokenizer_lib.load_tokenizer(tmp_path / "first")
  assert (reloaded.eot_id, reloaded.bos_id, reloaded.eos_id) == (tok.eot_id, tok.bos_id, tok.eos_id)
  reloaded.save_files(tmp_path / "second")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "first" / name).read_text() == (tmp_path / "second" / name).read_text()


def test_instruct_hf_model_converts_and_exports_with_lima_template(tmp_path):
  """An HF instruct model (own chat template, extra special tokens) as init_from / convert input."""
  hf_dir = ref.save_model(ref.make_model("llama1"), tmp_path / "hf")
  src = _bpe_dir(tmp_path / "tok", instruct=True)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (hf_dir / name).write_bytes((src / name).read_bytes())
  tok = tokenizer_lib.load_tokenizer(hf_dir)
  convert.hf_to_orbax(hf_dir, tmp_path / "ckpt", add_eot=True)
  convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "export")
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  turns = ["hello world", "the quick brown fox", "jumps over"]
  assert _ids(hf.apply_chat_template(_messages(turns), add_generation_prompt=True)) == \
      data.tokenize_prompt(tok, turns).tolist()
  gen = json.loads((tmp_path / "export" / "generation_config.json").read_text())
  assert tok.eot_id in gen["eos_token_id"] and tok.eos_id in gen["eos_token_id"]
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
  assert model.config.vocab_size == tok.vocab_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random checkpoint with the bundled tokenizer, and its export."""
  tok = tokenizer_lib.load_tokenizer(data.bundled_paths()["tokenizer"])
  cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, mlp_dim=64,
                              max_seq_len=512)
  params = jax.tree.map(lambda x: x * 20.0, model_lib.init_params(cfg, jax.random.key(0)))
  root = tmp_path_factory.mktemp("tiny")
  checkpoint.save_model(root / "ckpt", params, cfg, tok.to_blob())
  convert.orbax_to_hf(root / "ckpt", root / "export")
  return tok, root


def test_generation_config_stops_at_eot_within_the_model_limit(tiny):
  tok, root = tiny
  gen = json.loads((root / "export" / "generation_config.json").read_text())
  defaults = sampling.SamplingConfig()
  assert gen["eos_token_id"] == [tok.eos_id, tok.eot_id]
  assert gen["max_new_tokens"] == 512 and "max_length" not in gen  # max_position_embeddings, not 2048.
  assert (gen["do_sample"], gen["top_p"], gen["temperature"], gen["repetition_penalty"]) == \
      (True, defaults.top_p, defaults.temperature, defaults.repetition_penalty)
  transformers.GenerationConfig.from_pretrained(str(root / "export")).validate(strict=True)


def test_generate_on_the_export_draws_no_transformers_warning(tiny, capfd):
  """transformers warns on every `generate(max_new_tokens=N)` when the file also sets max_length."""
  _, root = tiny
  model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "export"))
  capfd.readouterr()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ids = torch.tensor([[1, 5, 6, 7]])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3)
  assert [str(w.message) for w in caught] == []
  assert capfd.readouterr().err == ""


def test_chat_pipeline_greedy_answer_equals_evaluate_greedy(tiny, tmp_path):
  tok, root = tiny
  prompts = [["What is a process?"], ["Name a colour.", "Blue.", "And another one?"]]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"conversations": p}) + "\n" for p in prompts))
  # The paper's penalty counts generated tokens only; transformers' counts the prompt too, so the
  # two agree at penalty 1.0 (or with sampling.penalty_scope="all").
  config = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=12, max_len=128,
                                   batch_size=2)
  records = evaluate.evaluate(str(root / "ckpt"), str(path), str(tmp_path / "out.jsonl"),
                              sampling_config=config, log=lambda _: None)
  chat = transformers.pipeline("text-generation", model=str(root / "export"), device="cpu")
  for turns, record in zip(prompts, records):
    out = chat(_messages(turns), do_sample=False, max_new_tokens=12, repetition_penalty=1.0)
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    assert answer["content"] == record["response"], turns
  assert any(r["response"] for r in records)
