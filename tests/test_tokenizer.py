"""Tokenizer with EOT: bundled SentencePiece model, tokenizer.json, blobs and HF export."""

import json
import pathlib
import shutil

import pytest

import lima_jax
from lima_jax import data
from lima_jax import tokenizer as tokenizer_lib

SAMPLE_MODEL = pathlib.Path(data.bundled_paths()["tokenizer"])


@pytest.fixture(scope="module")
def sp_tok():
  return tokenizer_lib.load_tokenizer(SAMPLE_MODEL)


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory):
  """A tiny LLaMA-3-style byte-level BPE tokenizer.json: special tokens added after the BPE
  vocabulary (as LLaMA-3's <|begin_of_text|> = 128000), BOS added by a post-processor."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20,
                          trainer)
  tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_0|>"])
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A",
      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
  directory = tmp_path_factory.mktemp("hf_json")
  tok.save(str(directory / "tokenizer.json"))
  return directory


def _bpe_size(directory):
  """Ids of the BPE model proper, read from the file independently of lima_jax."""
  spec = json.loads((directory / "tokenizer.json").read_text())
  return max(spec["model"]["vocab"].values()) + 1


def test_bundled_sentencepiece_ids(sp_tok):
  # LLaMA's conventions: unk 0, bos 1, eos 2, no pad piece (pad falls back to eos).
  assert sp_tok.kind == "sentencepiece"
  assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 2)
  assert sp_tok.base_vocab_size == 1024
  assert sp_tok.eot_id == 1024 and sp_tok.vocab_size == 1025
  assert sp_tok.eot_text == "<EOT>"
  assert lima_jax.load_tokenizer is tokenizer_lib.load_tokenizer


def test_golden_pieces(sp_tok):
  # Checked by hand: '▁What' '▁is' '▁' '1' '5' '%' '▁of' '▁' '8' '0' '?' (digits split).
  assert sp_tok.encode("What is 15% of 80?") == [502, 295, 934, 965, 991, 1019, 302, 934, 1004,
                                                 963, 970]
  # Byte fallback: '!' is not a piece, so it is the byte piece <0x21> = 3 + 0x21.
  assert sp_tok.encode("Thanks!") == [572, 287, 959, 941, 3 + 0x21]
  assert sp_tok.encode("line\nnext")[1] == 3 + 0x0A  # Newlines are bytes, as in LLaMA.


def test_spelled_eot_is_plain_text(sp_tok):
  ids = sp_tok.encode("Hi <EOT> there")
  # '▁H' 'i' '▁' '<' 'E' 'O' 'T' '>' '▁there', with '<' and '>' as byte pieces.
  assert ids == [380, 940, 934, 3 + ord("<"), 986, 1000, 962, 3 + ord(">"), 894]
  assert sp_tok.eot_id not in ids
  assert sp_tok.decode(ids) == "Hi <EOT> there"


def test_eot_never_collides_with_a_piece(sp_tok):
  text = "".join(chr(c) for c in range(32, 127)) + " <EOT> </s> <s> <unk> \u00e9\u4e2d\U0001f600\n\t"
  ids = sp_tok.encode(text)
  assert max(ids) < sp_tok.base_vocab_size == sp_tok.eot_id
  # Every base id decodes without involving EOT, and EOT decodes to nothing.
  assert sp_tok.decode([sp_tok.eot_id]) == ""


def test_decode_drops_specials_and_rejects_out_of_range(sp_tok):
  ids = sp_tok.encode("It is 12.")
  framed = [sp_tok.bos_id] + ids + [sp_tok.eot_id, sp_tok.eos_id]
  assert sp_tok.decode(framed) == "It is 12."
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1025\)"):
    sp_tok.decode(ids + [1100])


def test_custom_eot_text(sp_tok):
  tok = tokenizer_lib.load_tokenizer(SAMPLE_MODEL, eot="<|eot|>")
  assert tok.eot_text == "<|eot|>" and tok.eot_id == 1024
  with pytest.raises(ValueError, match="non-empty string"):
    tokenizer_lib.load_tokenizer(SAMPLE_MODEL, eot="")


def test_missing_tokenizer_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.model: tokenizer not found"):
    tokenizer_lib.load_tokenizer(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match=r"no tokenizer\.model or tokenizer\.json"):
    tokenizer_lib.load_tokenizer(tmp_path)
  (tmp_path / "broken.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match=r"broken\.model: tokenizer\.model: not a SentencePiece"):
    tokenizer_lib.load_tokenizer(tmp_path / "broken.model")


def test_directory_prefers_tokenizer_model(tmp_path, hf_json_dir):
  shutil.copy(SAMPLE_MODEL, tmp_path / "tokenizer.model")
  shutil.copy(hf_json_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  assert tokenizer_lib.load_tokenizer(tmp_path).kind == "sentencepiece"
  (tmp_path / "tokenizer.model").unlink()
  assert tokenizer_lib.load_tokenizer(tmp_path).kind == "hf_json"


def test_blob_round_trip(sp_tok, hf_json_dir):
  for tok in (sp_tok, tokenizer_lib.load_tokenizer(hf_json_dir, eot="<EOT>")):
    blob = json.loads(json.dumps(tok.to_blob()))  # JSON-able, as a checkpoint stores it.
    assert blob["kind"] == tok.kind and blob["eot"] == "<EOT>"
    again = tokenizer_lib.load_tokenizer_from_blob(blob)
    text = "hello world, the quick brown fox <EOT>"
    assert again.encode(text) == tok.encode(text)
    assert (again.eot_id, again.bos_id, again.eos_id, again.vocab_size) == (
        tok.eot_id, tok.bos_id, tok.eos_id, tok.vocab_size)
  with pytest.raises(ValueError, match=r"lacks \['files'\]"):
    tokenizer_lib.Tokenizer.from_blob({"eot": "<EOT>", "kind": "sentencepiece"})


def test_tokenizer_json_interface(hf_json_dir):
  tok = tokenizer_lib.load_tokenizer(hf_json_dir / "tokenizer.json")
  n = _bpe_size(hf_json_dir)  # Then <|begin_of_text|> = n, <|end_of_text|> = n + 1, reserved n + 2.
  assert tok.kind == "hf_json"
  # EOT comes after the highest id, added tokens included.
  assert (tok.base_vocab_size, tok.eot_id, tok.vocab_size) == (n + 3, n + 3, n + 4)
  assert (tok.bos_id, tok.eos_id) == (n, n + 1)  # Found by name among the added tokens.
  assert tok.pad_id == tok.eos_id
  ids = tok.encode("hello world")
  assert ids and tok.bos_id not in ids  # No BOS from the post-processor.
  spelled = tok.encode("the <EOT> and <|end_of_text|>")
  assert max(spelled) < tok.base_vocab_size and tok.eos_id not in spelled
  assert tok.decode(spelled) == "the <EOT> and <|end_of_text|>"
  assert tok.decode([tok.bos_id] + ids + [tok.eot_id, tok.eos_id]) == "hello world"


def test_tokenizer_config_names_special_tokens(tmp_path, hf_json_dir):
  shutil.copy(hf_json_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|reserved_0|>"}))
  tok = tokenizer_lib.load_tokenizer(tmp_path)
  n = _bpe_size(hf_json_dir)
  assert (tok.bos_id, tok.eos_id) == (n, n + 2)


def test_save_files_sentencepiece(tmp_path, sp_tok):
  written = {p.name for p in sp_tok.save_files(tmp_path)}
  assert written == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["added_tokens_decoder"]["1024"]["content"] == "<EOT>"
  assert config["added_tokens_decoder"]["1024"]["special"] is True
  assert "<EOT>" in json.loads((tmp_path / "special_tokens_map.json").read_text())[
      "additional_special_tokens"]
  again = tokenizer_lib.load_tokenizer(tmp_path)
  assert again.eot_id == 1024 and again.encode("Hi there") == sp_tok.encode("Hi there")


def test_save_files_tokenizer_json_is_idempotent(tmp_path, hf_json_dir):
  tok = tokenizer_lib.load_tokenizer(hf_json_dir)
  tok.save_files(tmp_path)
  spec = json.loads((tmp_path / "tokenizer.json").read_text())
  assert {"id": tok.eot_id, "content": "<EOT>", "special": True}.items() <= spec[
      "added_tokens"][-1].items()
  # Loading the export gives the same ids: the declared EOT keeps its id and stays special-only.
  again = tokenizer_lib.load_tokenizer(tmp_path)
  assert (again.eot_id, again.base_vocab_size, again.vocab_size) == (
      tok.eot_id, tok.base_vocab_size, tok.vocab_size)
  assert again.encode("hello <EOT>") == tok.encode("hello <EOT>")
  assert again.to_blob()["files"].keys() >= {"tokenizer.json", "tokenizer_config.json"}


def test_hugging_face_loads_the_export_with_the_same_ids(tmp_path, sp_tok, hf_json_dir):
  transformers = pytest.importorskip("transformers")
  for tok, name in ((sp_tok, "sp"), (tokenizer_lib.load_tokenizer(hf_json_dir), "json")):
    tok.save_files(tmp_path / name)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
    assert hf.convert_tokens_to_ids("<EOT>") == tok.eot_id
    assert hf("hello world", add_special_tokens=False)["input_ids"] == tok.encode("hello world")
