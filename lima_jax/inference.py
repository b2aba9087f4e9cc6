"""A model ready to answer prompts: parameters on the mesh, its tokenizer, its stop ids and prompt layout.

Shared by tools/evaluate.py and tools/chat.py. The path is opened by `lima_jax.source` (a
Hugging Face directory, a lima_jax checkpoint or workdir, a LoRA checkpoint merged onto its base),
which also says whether the model's EOT row is trained.

LIMA prompts are `[BOS] + enc(turn 1) + [EOT] + ... + enc(last user turn) + [EOT]`, and the
answer ends at EOT (or EOS). A base model that was never fine-tuned has no EOT row: its vocabulary
equals the tokenizer's base vocabulary. Such a model is prompted with the turns joined by blank
lines, without EOT, and stops only at EOS (or the token limit); `LoadedModel.notes` says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from etils import epath
from jax.sharding import Mesh

from lima_jax import checkpoint
from lima_jax import data as data_lib
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import sampling
from lima_jax import source as source_lib
from lima_jax import tokenizer as tokenizer_lib

HF_CONFIG = checkpoint.HF_CONFIG
HF_GENERATION_CONFIG = "generation_config.json"
BASE_MODEL_TURN_SEPARATOR = "\n\n"


@dataclasses.dataclass
class LoadedModel:
  model_config: model_lib.ModelConfig
  params: dict
  tokenizer: tokenizer_lib.Tokenizer
  source: str  # "checkpoint" or "huggingface".
  path: str
  stop_ids: tuple[int, ...]
  has_eot: bool  # False: a base model without the EOT row (see the module docstring).
  notes: list[str]
  mesh: Mesh | None = None  # Where the parameters live.

  def prompt_ids(self, turns: Sequence[str]) -> list[int]:
    """Token ids of a conversation that ends on a user turn, laid out for this model."""
    if not turns or len(turns) % 2 == 0:
      raise ValueError(f"a prompt must end on a user turn (an odd number of turns), got {len(turns)}")
    if self.has_eot:
      return data_lib.tokenize_prompt(self.tokenizer, turns).tolist()
    bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
    return bos + self.tokenizer.encode(BASE_MODEL_TURN_SEPARATOR.join(turns))

  def generate(self, prompts: Sequence[Sequence[int]], sampling_config: sampling.SamplingConfig,
               **kwargs) -> list[sampling.GenerationResult]:
    """`sampling.generate` with this model's stop ids, pad, BOS and mesh."""
    return sampling.generate(self.model_config, self.params, prompts, sampling_config=sampling_config,
                             stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_id,
                             bos_id=self.tokenizer.bos_id, mesh=self.mesh, **kwargs)


def _generation_config_eos(path: epath.Path) -> list[int]:
  """EOS ids a Hugging Face generation_config.json lists (LLaMA-3 lists several)."""
  file = path / HF_GENERATION_CONFIG
  if not file.is_file():
    return []
  try:
    eos = json.loads(file.read_text()).get("eos_token_id")
  except (OSError, json.JSONDecodeError):
    return []
  eos = eos if isinstance(eos, list) else [eos]
  return [int(e) for e in eos if isinstance(e, int)]


def load_model(path: str | os.PathLike, *, mesh: Mesh | None = None, tokenizer_path: str | None = None,
               eot: str = tokenizer_lib.DEFAULT_EOT, dtype: str | None = None) -> LoadedModel:
  """Loads parameters (each device reads only its shards) and the tokenizer, and picks stop ids.

  `tokenizer_path` overrides the source's tokenizer; `dtype` ("float32", "bfloat16") overrides
  the parameter and compute dtype (default: the checkpoint's, float32 for Hugging Face). Errors
  name the path, not a flag: the command adds its own.
  """
  opened = source_lib.open_model(path, dtype=dtype, tokenizer_path=tokenizer_path, eot=eot)
  notes: list[str] = []
  if opened.path != paths.absolute(path) and opened.kind != source_lib.HUGGINGFACE:
    notes.append(f"using checkpoint {opened.path}")
  if opened.kind == source_lib.LORA:
    lora = opened.stored_lora
    notes.append(f"merged rank-{lora.rank} LoRA adapters into {lora.base or 'their random base'}")
  tok = opened.tokenizer
  opened.check_vocabulary()
  config, params = opened.model_config, opened.read_params(mesh)
  vocab, has_eot = config.vocab_size, opened.eot_trained
  stops = [tok.eot_id, tok.eos_id] if has_eot else [tok.eos_id]
  if not has_eot:
    why = ("has no EOT row" if vocab == tok.base_vocab_size else
           f"has a spare, untrained row for EOT (id {tok.eot_id})")
    notes.append(f"the model's vocabulary ({vocab}) {why} (a base model): prompts are the "
                 f"turns joined by blank lines, and answers stop at EOS only (id {tok.eos_id})")
  if vocab > tok.vocab_size:
    notes.append(f"the model has {vocab} rows for {opened.usable_rows} tokenizer ids: the rest are "
                 f"padding, never sampled")
    config, params = sampling.without_padding_rows(config, params, opened.usable_rows, mesh)
  if opened.kind == source_lib.HUGGINGFACE:
    stops += [e for e in _generation_config_eos(opened.path) if e < vocab]
  stop_ids = tuple(sorted({s for s in stops if s is not None}))
  if not stop_ids:
    notes.append("no stop id (the tokenizer has no EOS): answers run to the token limit")
  kind = "huggingface" if opened.kind == source_lib.HUGGINGFACE else "checkpoint"
  return LoadedModel(config, params, tok, kind, str(opened.path), stop_ids, has_eot, notes, mesh)


def generator_name(path: str | os.PathLike) -> str:
  """A default name for a model's answers: its directory, with the step for training checkpoints."""
  p = paths.absolute(path)
  if p.name.isdigit() and p.parent.name == checkpoint.CHECKPOINTS_SUBDIR:
    return f"{p.parent.parent.name}-step{p.name}"
  return p.name
