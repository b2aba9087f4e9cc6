"""Chat messages as a model's prompt: LIMA's layout, or an instruct model's own chat template.

The open baselines of a pairwise study (Llama-3.1-Instruct, Qwen2.5-Instruct, Mistral-Instruct)
must be asked the way they were tuned: with the Jinja `chat_template` their
`tokenizer_config.json` (or `chat_template.jinja`) ships. It is rendered here as transformers'
`apply_chat_template` renders it (a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, an unescaped `tojson`, the special tokens'
texts as variables, `add_generation_prompt=True`), and the text is tokenized as transformers'
fast tokenizers do (`tokenizer.json`, special tokens in the text are their ids, nothing added),
so the ids equal `apply_chat_template(..., tokenize=True)`'s.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

from lima_jax import errors
from lima_jax import paths

LIMA = "lima"
MODEL = "model"
CHOICES = (LIMA, MODEL)
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def messages_from_turns(turns: Sequence[str]) -> list[dict]:
  """A conversation's turns (user first, alternating) as chat messages."""
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def fold_system(messages: Sequence[dict]) -> list[dict]:
  """The messages with each system message put in front of the user message after it (separated
  by a blank line), for models trained without a system role (LIMA's)."""
  out, system = [], []
  for message in messages:
    if message.get("role") == "system":
      system.append(str(message.get("content") or ""))
    elif system and message.get("role") == "user":
      out.append({**message, "content": "\n\n".join(system + [str(message.get("content") or "")])})
      system = []
    else:
      out.append(dict(message))
  return out


def turns_from_messages(messages: Sequence[dict]) -> list[str]:
  """Chat messages as LIMA's turns (user first, alternating), system messages folded in."""
  turns = []
  for i, message in enumerate(fold_system(messages)):
    expected = "user" if i % 2 == 0 else "assistant"
    if message.get("role") != expected:
      raise ValueError(f"message {i} has role {message.get('role')!r}; LIMA's layout expects {expected!r} there")
    turns.append(str(message.get("content") or ""))
  return turns


def _token_text(value: Any) -> str | None:
  if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
    return value.get("content")
  return value if isinstance(value, str) else None


def _pick_template(value: Any, where: str) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, list):  # Named templates: [{"name": "default", "template": ...}, ...].
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
      return named["default"]
  raise errors.InputError(f"{where}: 'chat_template' is neither a template string nor a list with a 'default' one")


def _environment():
  """The Jinja environment transformers renders chat templates in."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                               extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


class ChatTemplate:
  """A Hugging Face directory's own chat template and the tokenizer its text is read with."""

  def __init__(self, directory: str | os.PathLike):
    root = paths.path(directory)
    config_file, template_file, tokenizer_file = root / CONFIG_FILE, root / TEMPLATE_FILE, root / TOKENIZER_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if template_file.is_file():
      source = template_file.read_text()
    elif config.get("chat_template"):
      source = _pick_template(config["chat_template"], str(config_file))
    else:
      raise errors.InputError(f"--chat_template=model: {root} has no chat template (no {TEMPLATE_FILE}, no "
                              f"'chat_template' in {CONFIG_FILE}); use --chat_template=lima")
    if not tokenizer_file.is_file():
      raise errors.InputError(f"--chat_template=model: {root} has no {TOKENIZER_FILE} (the fast tokenizer "
                              "the template's text is tokenized with)")
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_file.read_text())
    self.special = {k: _token_text(config.get(k)) for k in _SPECIAL_KEYS}
    self._template = _environment().from_string(source)
    eos = self.special["eos_token"]
    self.eos_id = None if eos is None else self._tokenizer.token_to_id(eos)

  def render(self, messages: Sequence[dict]) -> str:
    """The prompt text, ending with the assistant's header (add_generation_prompt)."""
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      return self._template.render(messages=list(messages), add_generation_prompt=True, **self.special)
    except jinja2.TemplateError as e:
      raise ValueError(f"the model's chat template refused the conversation: {e}") from None

  def ids(self, messages: Sequence[dict]) -> list[int]:
    """The prompt's token ids: the rendered text with its special tokens as their ids."""
    return self._tokenizer.encode(self.render(messages), add_special_tokens=False).ids
