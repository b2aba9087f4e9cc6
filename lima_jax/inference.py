"""A model ready to answer prompts: parameters on the mesh, its tokenizer, its stop ids and prompt layout.

Shared by tools/evaluate.py and tools/chat.py. Two kinds of source:

* a lima_jax checkpoint (training step, workdir or `convert_weights.py hf-to-orbax` output): the
  tokenizer is the blob stored with it;
* a Hugging Face directory (config.json + safetensors): the tokenizer files inside it.

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

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from lima_jax import checkpoint
from lima_jax import convert
from lima_jax import data as data_lib
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import sampling
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


def _shardings(config: model_lib.ModelConfig, mesh: Mesh | None):
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, model_lib.abstract_params(config))
  return model_lib.param_shardings(config, mesh)


def _with_dtype(config: model_lib.ModelConfig, dtype: str | None) -> model_lib.ModelConfig:
  if not dtype:
    return config
  dtype = jnp.dtype(dtype).name
  return config.replace(param_dtype=dtype, dtype=dtype)


def load_model(path: str | os.PathLike, *, mesh: Mesh | None = None, tokenizer_path: str | None = None,
               eot: str = tokenizer_lib.DEFAULT_EOT, dtype: str | None = None) -> LoadedModel:
  """Loads parameters (each device reads only its shards) and the tokenizer, and picks stop ids.

  `tokenizer_path` overrides the source's tokenizer; `dtype` ("float32", "bfloat16") overrides
  the parameter and compute dtype (default: the checkpoint's, float32 for Hugging Face).
  """
  path = paths.path(path)
  notes: list[str] = []
  extra_stops: list[int] = []
  if checkpoint.is_hf_dir(path):
    source = "huggingface"
    config = _with_dtype(convert.HFCheckpoint(path).model_config, dtype or "float32")
    params, config = convert.load_hf_params(path, _shardings(config, mesh), dtype=config.param_dtype)
    config = _with_dtype(config, dtype or "float32")
    tok = tokenizer_lib.load_tokenizer(tokenizer_path or path, eot=eot)
    extra_stops = _generation_config_eos(path)
  else:
    source = "checkpoint"
    try:
      ckpt = checkpoint.resolve(path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"--checkpoint {path}: neither a Hugging Face directory (no {HF_CONFIG}) "
                              f"nor a lima_jax checkpoint ({e})") from None
    if ckpt != paths.absolute(path):
      notes.append(f"using checkpoint {ckpt}")
    path = ckpt
    config = _with_dtype(checkpoint.read_model_config(ckpt), dtype)
    if config.lora is not None:  # LoRA adapters: merged into the base they name.
      notes.append(f"merged rank-{config.lora.rank} LoRA adapters into {config.lora.base or 'their random base'}")
      config = config.replace(lora=None)
      params = convert.load_merged_params(ckpt, _shardings(config, mesh), dtype=config.param_dtype)
    else:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            model_lib.abstract_params(config), _shardings(config, mesh))
      params = checkpoint.restore_params(ckpt, target)
    if tokenizer_path:
      tok = tokenizer_lib.load_tokenizer(tokenizer_path, eot=eot)
    else:
      blob = checkpoint.read_tokenizer_blob(ckpt)
      if blob is None:
        raise ValueError(f"{ckpt}: the checkpoint carries no tokenizer; pass --tokenizer "
                         f"(tokenizer.model, tokenizer.json or their directory)")
      tok = tokenizer_lib.load_tokenizer_from_blob(blob)
  vocab = config.vocab_size
  # Rows past the tokenizer's ids (an embedding padded past it, e.g. 32064 rows for 32000
  # pieces) are padding: a base model's EOT id lands on one of them, while lima_jax training
  # (its checkpoints, or their exports, which declare EOT) trained that row as EOT.
  padded_rows = vocab > tok.vocab_size
  trained_eot = vocab == tok.vocab_size or (padded_rows and (
      (path / checkpoint.TRAIN_STATE).is_dir() if source == "checkpoint" else _declares_eot(path, tok)))
  if vocab < tok.base_vocab_size or (vocab < tok.vocab_size and vocab != tok.base_vocab_size):
    raise ValueError(
        f"{path}: the model's vocabulary has {vocab} ids but the tokenizer has {tok.base_vocab_size} "
        f"(+ EOT = {tok.vocab_size}); pass the model's own tokenizer with --tokenizer")
  if trained_eot:
    has_eot = True
    stops = [tok.eot_id, tok.eos_id]
  else:
    has_eot = False
    stops = [tok.eos_id]
    why = ("has no EOT row" if vocab == tok.base_vocab_size else
           f"has a spare, untrained row for EOT (id {tok.eot_id})")
    notes.append(f"the model's vocabulary ({vocab}) {why} (a base model): prompts are the "
                 f"turns joined by blank lines, and answers stop at EOS only (id {tok.eos_id})")
  if padded_rows:
    usable = tok.vocab_size if has_eot else tok.base_vocab_size
    notes.append(f"the model has {vocab} rows for {usable} tokenizer ids: the rest are padding, "
                 f"never sampled")
    config, params = sampling.without_padding_rows(config, params, usable, mesh)
  stops += [e for e in extra_stops if e < vocab]
  stop_ids = tuple(sorted({s for s in stops if s is not None}))
  if not stop_ids:
    notes.append("no stop id (the tokenizer has no EOS): answers run to the token limit")
  return LoadedModel(config, params, tok, source, str(path), stop_ids, has_eot, notes, mesh)


def _declares_eot(path: epath.Path, tok: tokenizer_lib.Tokenizer) -> bool:
  """True where a Hugging Face directory's tokenizer_config.json names EOT at its id (a lima_jax
  export of a fine-tuned model), so the row there is trained."""
  file = path / tokenizer_lib.HF_CONFIG_FILE
  if not file.is_file():
    return False
  try:
    decoder = json.loads(file.read_text()).get("added_tokens_decoder") or {}
  except (OSError, json.JSONDecodeError):
    return False
  return (decoder.get(str(tok.eot_id)) or {}).get("content") == tok.eot_text


def generator_name(path: str | os.PathLike) -> str:
  """A default name for a model's answers: its directory, with the step for training checkpoints."""
  p = paths.absolute(path)
  if p.name.isdigit() and p.parent.name == checkpoint.CHECKPOINTS_SUBDIR:
    return f"{p.parent.parent.name}-step{p.name}"
  return p.name
