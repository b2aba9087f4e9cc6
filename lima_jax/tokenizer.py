"""Tokenizers for LIMA: a pretrained vocabulary plus one new end-of-turn (EOT) token.

LIMA (Zhou et al., 2023) separates the turns of a conversation with a special EOT token that the
base model has never seen. Its id is the size of the original vocabulary, so the only change a
pretrained checkpoint needs is one more embedding / LM-head row (see the model converter).

Two vocabulary formats are supported behind one interface:

* SentencePiece `tokenizer.model` (LLaMA-1/2 and the bundled sample), via `sentencepiece`;
* Hugging Face `tokenizer.json` (byte-level BPE as LLaMA-3, Qwen2/2.5/3 and Mistral v3 ship),
  via `tokenizers`; `tokenizer_config.json` names BOS, EOS and pad (a `null` BOS, as Qwen's, means
  the family has none).

Text is always encoded as plain text: a user turn that happens to spell `<EOT>` (or, for
`tokenizer.json`, `<|end_of_text|>`) becomes ordinary pieces, never a special id. Only the data
pipeline inserts special ids.

Checkpoints carry the tokenizer as a JSON-able blob (`Tokenizer.to_blob`) so that evaluation and
export need no tokenizer flag; `Tokenizer.save_files` writes a Hugging Face-loadable directory
that declares EOT as an added special token with the same id, and a chat template that renders
LIMA's layout, so `apply_chat_template` (transformers, vLLM, TRL) gives the ids lima_jax trains
and generates on.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Mapping, Sequence

from etils import epath

from lima_jax import checkpoint
from lima_jax import paths

SENTENCEPIECE = "sentencepiece"
HF_JSON = "hf_json"
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_MAP_FILE = "special_tokens_map.json"
DEFAULT_EOT = "<EOT>"

# Names under which tokenizer.json files commonly ship BOS / EOS, most specific first; used only
# when no tokenizer_config.json / special_tokens_map.json has the key at all (a null value is an
# answer: Qwen declares `bos_token: null`, and its vocabulary has no BOS).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class _SentencePieceVocab:
  """The SentencePiece side of a `Tokenizer`: plain encode/decode and the special ids."""

  kind = SENTENCEPIECE

  def __init__(self, files: Mapping[str, bytes]):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self.files = {SP_FILE: files[SP_FILE]}
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(files[SP_FILE])
    except Exception as e:  # sentencepiece raises a bare RuntimeError with a terse message.
      raise ValueError(f"{SP_FILE}: not a SentencePiece model ({e})") from e
    self.size = self._sp.get_piece_size()
    self.bos_id = self._nonnegative(self._sp.bos_id())
    self.eos_id = self._nonnegative(self._sp.eos_id())
    self.pad_id = self._nonnegative(self._sp.pad_id())
    self.unk_id = self._nonnegative(self._sp.unk_id())

  @staticmethod
  def _nonnegative(i: int) -> int | None:
    return i if i >= 0 else None  # SentencePiece says -1 for "no such piece".

  def encode(self, text: str) -> list[int]:
    # Control and user-defined symbols are not parsed out of the input: a SentencePiece model
    # has no EOT piece at all, so "<EOT>" in text becomes ordinary pieces (or byte pieces).
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(list(ids))

  def piece(self, i: int | None) -> str | None:
    return None if i is None else self._sp.id_to_piece(i)


class _HFJsonVocab:
  """The `tokenizer.json` side of a `Tokenizer` (byte-level BPE and anything `tokenizers` reads).

  The EOT token is not added to the `tokenizers.Tokenizer` object: it would then be parsed out of
  user text. If the file already declares the EOT text as an added token (a directory that
  `Tokenizer.save_files` wrote), that entry is removed before loading and its id kept, so loading
  an exported directory gives the same ids as the original.
  """

  kind = HF_JSON

  def __init__(self, files: Mapping[str, bytes], eot: str):
    import tokenizers  # pylint: disable=g-import-not-at-top

    self.files = {name: files[name] for name in (HF_FILE, HF_CONFIG_FILE, HF_SPECIAL_MAP_FILE)
                  if name in files}
    try:
      spec = json.loads(files[HF_FILE])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{HF_FILE}: not valid JSON ({e})") from e
    added = spec.get("added_tokens") or []
    self.declared_eot_id = next((t["id"] for t in added if t.get("content") == eot), None)
    spec["added_tokens"] = [t for t in added if t.get("content") != eot]
    try:
      self._tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises a bare Exception on a bad spec.
      raise ValueError(f"{HF_FILE}: the tokenizers library cannot load it ({e})") from e
    # Special tokens in user text are encoded as text, never as their special ids.
    self._tok.encode_special_tokens = True
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.size = max(vocab.values()) + 1 if vocab else 0
    config = self._special_token_config(files)
    self.bos_id = self._find(config, "bos_token", _BOS_NAMES, vocab)
    if self.bos_id is None and "bos_token" not in config:
      self.bos_id = self._post_processor_bos(spec, vocab)
    self.eos_id = self._find(config, "eos_token", _EOS_NAMES, vocab)
    self.pad_id = self._find(config, "pad_token", _PAD_NAMES, vocab)
    self.unk_id = self._find(config, "unk_token", (), vocab)

  @staticmethod
  def _special_token_config(files: Mapping[str, bytes]) -> dict[str, Any]:
    """Merges special_tokens_map.json under tokenizer_config.json (the latter wins, as in HF)."""
    merged = {}
    for name in (HF_SPECIAL_MAP_FILE, HF_CONFIG_FILE):
      if name in files:
        try:
          merged.update(json.loads(files[name]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          raise ValueError(f"{name}: not valid JSON ({e})") from e
    return merged

  @staticmethod
  def _find(config: Mapping[str, Any], key: str, fallbacks: Sequence[str],
            vocab: Mapping[str, int]) -> int | None:
    """The id of the special token `config[key]` names (str or {"content": str}; null = none),
    else, when the key is absent, of a known name."""
    if key not in config:
      return next((vocab[name] for name in fallbacks if name in vocab), None)
    declared = config[key]
    if isinstance(declared, dict):
      declared = declared.get("content")
    if isinstance(declared, str):
      if declared not in vocab:
        raise ValueError(f"{HF_CONFIG_FILE}: {key}={declared!r} is not a token of {HF_FILE}")
      return vocab[declared]
    return None

  @staticmethod
  def _post_processor_bos(spec: Mapping[str, Any], vocab: Mapping[str, int]) -> int | None:
    """BOS from a TemplateProcessing post-processor that starts single inputs with a special."""
    processors = [spec.get("post_processor") or {}]
    processors += processors[0].get("processors", [])  # A Sequence post-processor.
    for proc in processors:
      single = proc.get("single") or []
      if proc.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
        return vocab.get(single[0]["SpecialToken"]["id"])
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)

  def piece(self, i: int | None) -> str | None:
    return None if i is None else self._tok.id_to_token(i)


def _jinja_string(text: str) -> str:
  """`text` as a Jinja string literal (JSON's escapes are ones Jinja reads back)."""
  return json.dumps(text)


def chat_template(bos: str | None, eot: str) -> str:
  """A Jinja chat template rendering LIMA's layout: [BOS] turn_1 EOT turn_2 EOT ... (no role tags).

  The generation prompt is empty: the answer starts right after the last user turn's EOT.
  Assistant text and its EOT sit inside `{% generation %}` so that transformers'
  `return_assistant_tokens_mask` (TRL's assistant-only loss) marks what lima_jax trains on. A
  system message, or turns that do not alternate user / assistant from a user turn, raise an
  error: LIMA was trained on neither, and guessing a layout would silently change the model.
  """
  return "".join([
      "{#- LIMA's layout (lima_jax.data): BOS, each turn's text then EOT, no role tags. -#}\n",
      "{%- for message in messages -%}\n",
      "{%- if message['role'] == 'system' -%}",
      "{{- raise_exception('This LIMA model was trained without a system prompt; put that text "
      "into the first user message instead.') -}}",
      "{%- elif message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}",
      "{{- raise_exception('LIMA conversations alternate user and assistant turns, starting "
      "with user; message ' ~ loop.index0 ~ ' has role ' ~ message['role']) -}}",
      "{%- endif -%}\n",
      "{%- endfor -%}\n",
      "{{- " + _jinja_string(bos) + " -}}\n" if bos else "",
      "{%- for message in messages -%}\n",
      "{%- if message['role'] == 'assistant' -%}",
      "{% generation %}{{- message['content'] + " + _jinja_string(eot) + " -}}{% endgeneration %}",
      "{%- else -%}",
      "{{- message['content'] + " + _jinja_string(eot) + " -}}",
      "{%- endif -%}\n",
      "{%- endfor -%}\n",
  ])


def _sentencepiece_tokenizer_json(model: bytes, eot_entry: Mapping[str, Any], eot_id: int
                                  ) -> bytes | None:
  """An equivalent `tokenizer.json` for a SentencePiece BPE model; None where not equivalent.

  transformers' own `LlamaTokenizer` rebuilds its pipeline from `tokenizer.model` and skips the
  dummy-prefix space when a text already starts with one, so " hi" would get other ids than
  SentencePiece gives lima_jax. This file keeps SentencePiece's rule: every piece of text
  between special tokens gets "▁" prepended and its spaces become "▁", then BPE merges in the
  order of the merged pieces' scores, falling back to byte pieces. Only models whose
  normalizer is the identity and that keep whitespace as is (LLaMA-1/2, the bundled sample) are
  converted; for others None (transformers then converts tokenizer.model itself).
  """
  try:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import decoders, models, normalizers, processors  # pylint: disable=g-import-not-at-top
  except (ImportError, TypeError):  # TypeError: a protobuf runtime the generated code rejects.
    return None
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  spec = proto.normalizer_spec
  normal, unknown, control, byte = 1, 2, 3, 6  # ModelProto.SentencePiece.Type
  if (proto.trainer_spec.model_type != 2 or spec.precompiled_charsmap or spec.remove_extra_whitespaces
      or spec.name not in ("identity", "") or spec.escape_whitespaces is False
      or any(p.type not in (normal, unknown, control, byte) for p in proto.pieces)):
    return None
  pieces = [p.piece for p in proto.pieces]
  vocab = {piece: i for i, piece in enumerate(pieces)}
  merges = []
  for i, p in enumerate(proto.pieces):
    if p.type != normal or len(p.piece) < 2:
      continue
    for cut in range(1, len(p.piece)):
      left, right = p.piece[:cut], p.piece[cut:]
      if left in vocab and right in vocab:
        merges.append((-p.score, i, vocab[left], vocab[right], left, right))
  merges.sort()
  unk = next((p.piece for p in proto.pieces if p.type == unknown), None)
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
      byte_fallback=proto.trainer_spec.byte_fallback))
  steps = [normalizers.Replace(" ", "▁")]
  if spec.add_dummy_prefix:
    steps.insert(0, normalizers.Prepend("▁"))
  tok.normalizer = normalizers.Sequence(steps)
  decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if spec.add_dummy_prefix:
    decode.append(decoders.Strip(" ", 1, 0))
  tok.decoder = decoders.Sequence(decode)
  tok.add_special_tokens([tokenizers.AddedToken(p.piece, normalized=False, special=True)
                          for p in proto.pieces if p.type in (unknown, control)])
  bos_id = proto.trainer_spec.bos_id
  if 0 <= bos_id < len(pieces):
    tok.post_processor = processors.TemplateProcessing(
        single=f"{pieces[bos_id]} $A", pair=f"{pieces[bos_id]} $A {pieces[bos_id]} $B",
        special_tokens=[(pieces[bos_id], bos_id)])
  out = json.loads(tok.to_str())
  out["added_tokens"].append({"id": eot_id, **eot_entry})
  return json.dumps(out, ensure_ascii=False, indent=2).encode("utf-8")


class Tokenizer:
  """A base vocabulary plus EOT, with LIMA's id conventions.

  Attributes:
    bos_id, eos_id: the base vocabulary's BOS / EOS ids (None when it has none).
    eot_id: the EOT id, `base_vocab_size` unless the files already declare it.
    pad_id: the base vocabulary's pad id, else `eos_id`, else 0. Padded positions are always
      masked by segment id 0, so its value never reaches attention or the loss.
    base_vocab_size: ids the base vocabulary knows (for tokenizer.json: max id + 1, added tokens
      included); a pretrained embedding has this many rows.
    vocab_size: ids including EOT, the embedding size a fine-tuned model needs.
    eot_text: the EOT token's text (used only when exporting to Hugging Face).
    eot_declared: whether the files themselves declare EOT (a lima_jax export), so that a model
      with spare vocabulary rows (Qwen) is known to have been fine-tuned with it.
    kind: "sentencepiece" or "hf_json".
  """

  def __init__(self, kind: str, files: Mapping[str, bytes], eot: str = DEFAULT_EOT):
    if not isinstance(eot, str) or not eot:
      raise ValueError(f"eot must be a non-empty string, got {eot!r}")
    if kind == SENTENCEPIECE:
      self._vocab = _SentencePieceVocab(files)
      declared_eot = None
    elif kind == HF_JSON:
      self._vocab = _HFJsonVocab(files, eot)
      declared_eot = self._vocab.declared_eot_id
    else:
      raise ValueError(f"unknown tokenizer kind {kind!r}; expected {SENTENCEPIECE!r} or {HF_JSON!r}")
    self.kind = kind
    self.eot_text = eot
    self.base_vocab_size = self._vocab.size
    self.eot_id = self.base_vocab_size if declared_eot is None else declared_eot
    # True when the files already name EOT (an export of a fine-tuned model), not only lima_jax.
    self.eot_declared = declared_eot is not None
    if self.eot_id < self.base_vocab_size:
      raise ValueError(f"{HF_FILE}: {eot!r} is declared with id {self.eot_id}, which another "
                       f"token already uses; remove it from added_tokens to get a fresh id")
    self.vocab_size = self.eot_id + 1
    self.bos_id = self._vocab.bos_id
    self.eos_id = self._vocab.eos_id
    fallback = self.eos_id if self.eos_id is not None else 0
    self.pad_id = self._vocab.pad_id if self._vocab.pad_id is not None else fallback
    # Ids `decode` leaves out: the specials the pipeline inserts, never text.
    self._special_ids = frozenset(
        i for i in (self.eot_id, self.bos_id, self.eos_id, self._vocab.pad_id) if i is not None)

  def __repr__(self) -> str:
    return (f"Tokenizer(kind={self.kind!r}, base_vocab_size={self.base_vocab_size}, "
            f"eot={self.eot_text!r}@{self.eot_id}, bos={self.bos_id}, eos={self.eos_id}, "
            f"pad={self.pad_id})")

  def encode(self, text: str) -> list[int]:
    """Encodes one utterance as plain text: no BOS/EOS, and never a special id."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    return self._vocab.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes ids to text, leaving out EOT, BOS, EOS and pad.

    Raises ValueError for an id outside [0, vocab_size): a model whose embedding is padded beyond
    the vocabulary must never emit those rows, and hiding it here would hide a sampler bug.
    """
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}) "
                       f"({self.base_vocab_size} base ids + EOT)")
    return self._vocab.decode([i for i in ids if i not in self._special_ids])

  # -- Serialisation: checkpoints and exports carry the original files. --------------------------

  def to_blob(self) -> dict[str, Any]:
    """A JSON-able description from which `from_blob` rebuilds an identical tokenizer."""
    return {
        "eot": self.eot_text,
        "kind": self.kind,
        "files": {name: base64.b64encode(data).decode("ascii")
                  for name, data in sorted(self._vocab.files.items())},
    }

  @classmethod
  def from_blob(cls, blob: Mapping[str, Any]) -> "Tokenizer":
    """Inverse of `to_blob`."""
    missing = {"eot", "kind", "files"} - set(blob)
    if missing:
      raise ValueError(f"tokenizer blob lacks {sorted(missing)}; it must come from "
                       f"Tokenizer.to_blob (keys eot, kind, files)")
    files = {name: base64.b64decode(data) for name, data in blob["files"].items()}
    return cls(blob["kind"], files, eot=blob["eot"])

  def save_files(self, directory: str | os.PathLike[str]) -> list[epath.Path]:
    """Writes the tokenizer as a Hugging Face directory, with EOT declared as a special token.

    Writes the original `tokenizer.model` or `tokenizer.json` (the latter with EOT appended to
    its added tokens; for a SentencePiece BPE model also an equivalent `tokenizer.json`),
    `tokenizer_config.json` with LIMA's `chat_template`, and `special_tokens_map.json`, so that
    `transformers.AutoTokenizer` encodes text and chats as lima_jax does, maps the EOT text to
    `eot_id`, and `load_tokenizer` on the directory gives back this tokenizer. A chat template
    the source files had (an instruct model's) is replaced: the model is now trained on LIMA's.
    Returns the written paths.
    """
    directory = paths.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    eot_entry = {"content": self.eot_text, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False, "special": True}
    names = {key: self._vocab.piece(i) for key, i in
             (("bos_token", self.bos_id), ("eos_token", self.eos_id),
              ("unk_token", self._vocab.unk_id), ("pad_token", self._vocab.pad_id))}
    names = {k: v for k, v in names.items() if v is not None}
    config: dict[str, Any] = {}
    outputs: dict[str, bytes] = {}
    # The generic tokenizers-backed class loads tokenizer.json as written; model-specific ones
    # (LlamaTokenizer) may rebuild its pre-tokenizer and change the ids.
    fast = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if self.kind == SENTENCEPIECE:
      outputs[SP_FILE] = self._vocab.files[SP_FILE]
      as_json = _sentencepiece_tokenizer_json(self._vocab.files[SP_FILE], eot_entry, self.eot_id)
      if as_json is None:
        config.update(tokenizer_class="LlamaTokenizer", legacy=True)
      else:
        outputs[HF_FILE] = as_json
        config.update(fast)
      config.update(add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False)
    else:
      spec = json.loads(self._vocab.files[HF_FILE])
      added = [t for t in spec.get("added_tokens") or [] if t.get("content") != self.eot_text]
      spec["added_tokens"] = added + [{"id": self.eot_id, **eot_entry}]
      outputs[HF_FILE] = json.dumps(spec, ensure_ascii=False, indent=2).encode("utf-8")
      if HF_CONFIG_FILE in self._vocab.files:
        config.update(json.loads(self._vocab.files[HF_CONFIG_FILE]))
      config.update(fast)
    config.update(names)
    decoder = dict(config.get("added_tokens_decoder") or {})
    decoder[str(self.eot_id)] = eot_entry
    config["added_tokens_decoder"] = decoder
    extra = [t for t in config.get("additional_special_tokens") or [] if t != self.eot_text]
    config["additional_special_tokens"] = extra + [self.eot_text]
    config["chat_template"] = chat_template(self._vocab.piece(self.bos_id), self.eot_text)
    special_map = {**names, "additional_special_tokens": config["additional_special_tokens"]}
    outputs[HF_CONFIG_FILE] = json.dumps(config, ensure_ascii=False, indent=2).encode("utf-8")
    outputs[HF_SPECIAL_MAP_FILE] = json.dumps(special_map, ensure_ascii=False,
                                              indent=2).encode("utf-8")
    written = []
    for name, data in outputs.items():
      (directory / name).write_bytes(data)
      written.append(directory / name)
    return written


def _read_tokenizer_files(path: epath.Path) -> tuple[str, dict[str, bytes]]:
  """Finds the vocabulary at `path` (a file or a model directory) and reads it, with its configs."""
  if path.is_dir():
    if (path / SP_FILE).is_file():  # LLaMA-1/2 HF directories hold both; the .model is canonical.
      path = path / SP_FILE
    elif (path / HF_FILE).is_file():
      path = path / HF_FILE
    else:
      raise FileNotFoundError(f"{path}: no {SP_FILE} or {HF_FILE} in this directory, and not a "
                              f"lima_jax checkpoint or workdir that carries a tokenizer")
  elif not path.is_file():
    raise FileNotFoundError(f"{path}: tokenizer not found (expected a SentencePiece .model file, "
                            f"a Hugging Face {HF_FILE}, or a directory holding either)")
  if path.suffix == ".json":
    files = {HF_FILE: path.read_bytes()}
    for name in (HF_CONFIG_FILE, HF_SPECIAL_MAP_FILE):
      if (path.parent / name).is_file():
        files[name] = (path.parent / name).read_bytes()
    return HF_JSON, files
  return SENTENCEPIECE, {SP_FILE: path.read_bytes()}


def _checkpoint_blob(path: epath.Path) -> dict | None:
  """The tokenizer a lima_jax checkpoint (or a workdir's newest one) carries, else None."""
  try:
    return checkpoint.read_tokenizer_blob(path)
  except FileNotFoundError:
    return None


def load_tokenizer(path: str | os.PathLike[str], eot: str = DEFAULT_EOT) -> Tokenizer:
  """Loads a SentencePiece `.model`, a `tokenizer.json`, a directory holding either, or the
  tokenizer stored in a lima_jax checkpoint or training workdir (as `load_pretrained` reads).

  A directory with both files uses `tokenizer.model`. Next to a `tokenizer.json`, a
  `tokenizer_config.json` / `special_tokens_map.json` (if present) names BOS, EOS and pad. A
  checkpoint's tokenizer keeps the EOT it was trained with; `eot` applies to the files only.
  """
  path = paths.path(path)
  if path.is_dir() and not (path / SP_FILE).is_file() and not (path / HF_FILE).is_file():
    blob = _checkpoint_blob(path)
    if blob is not None:
      return load_tokenizer_from_blob(blob)
  kind, files = _read_tokenizer_files(path)
  try:
    return Tokenizer(kind, files, eot=eot)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def load_tokenizer_from_blob(blob: Mapping[str, Any]) -> Tokenizer:
  """Rebuilds the tokenizer a checkpoint recorded with `Tokenizer.to_blob`."""
  return Tokenizer.from_blob(blob)
