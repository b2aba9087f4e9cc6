"""A model on disk, opened in one call: `open_model(path)` -> `ModelSource`.

Three kinds of path, told apart here and nowhere else:

* a Hugging Face directory (config.json + safetensors; its tokenizer files beside them);
* a lima_jax checkpoint: a training step, a workdir or its checkpoints/ (the newest finished
  step), or `convert_weights.py hf-to-orbax` output; its tokenizer is the blob stored with it;
* a LoRA checkpoint (a checkpoint whose model_config has a lora section): read as its adapters
  merged into the base it names, one block at a time.

The EOT row, the one policy every loader shares (training's `init_from`, evaluation and chat,
`lima_jax.load_pretrained`, the exports). LIMA ends each turn with EOT, the first id past the
tokenizer's base vocabulary. A model's embedding rows stand to it in one of three ways:

* TRAINED: the rows end exactly at EOT, or they are padded past it and the source says it
  trained that row (a lima_jax training checkpoint; an export whose tokenizer_config.json
  declares EOT at its id);
* ABSENT: the rows end before EOT (a base model): fine-tuning appends a row at the mean;
* UNTRAINED: the embedding is padded past the tokenizer (e.g. 32064 rows for 32000 pieces) and
  EOT's id lands on a padding row: fine-tuning overwrites it with the mean of the tokenizer's rows.

Rows past `usable_rows` are padding, never sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from lima_jax import checkpoint
from lima_jax import lora as lora_lib
from lima_jax import metrics
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.convert import hf_reader
from lima_jax.convert import model_readers
from lima_jax.convert import vocab_rows

HUGGINGFACE, CHECKPOINT, LORA = "huggingface", "checkpoint", "lora"
TRAINED, ABSENT, UNTRAINED = "trained", "absent", "untrained"


@dataclasses.dataclass
class ModelSource:
  """An opened model: its config is read; its tokenizer on first use, its parameters on `read_params`."""
  path: epath.Path  # The directory read: for a workdir, its newest finished step.
  kind: str  # HUGGINGFACE, CHECKPOINT or LORA.
  model_config: model_lib.ModelConfig  # The model as read (a LoRA checkpoint's: merged, no lora).
  stored_lora: lora_lib.LoraConfig | None = None  # A LoRA checkpoint's adapters, merged on read.
  given_tokenizer: tokenizer_lib.Tokenizer | None = None  # Overrides the source's own.
  eot: str = tokenizer_lib.DEFAULT_EOT  # EOT text for a Hugging Face directory's tokenizer files.

  @functools.cached_property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    """The given tokenizer, else the source's own (ValueError for a checkpoint that carries none)."""
    if self.given_tokenizer is not None:
      return self.given_tokenizer
    if self.kind == HUGGINGFACE:
      return tokenizer_lib.load_tokenizer(self.path, eot=self.eot)
    blob = checkpoint.read_tokenizer_blob(self.path)
    if blob is None:
      raise ValueError(f"{self.path}: the checkpoint carries no tokenizer; name one (tokenizer.model, "
                       f"tokenizer.json or their directory)")
    return tokenizer_lib.load_tokenizer_from_blob(blob)

  @property
  def marks_eot_trained(self) -> bool:
    """A training checkpoint, or an export whose tokenizer_config.json declares EOT at its id."""
    if self.kind == HUGGINGFACE:
      return declares_eot(self.path, self.tokenizer)
    return (self.path / checkpoint.TRAIN_STATE).is_dir()

  @property
  def eot_row(self) -> str:
    """TRAINED, ABSENT or UNTRAINED: how the model's rows stand to the tokenizer's EOT."""
    rows, tok = self.model_config.vocab_size, self.tokenizer
    if rows == tok.vocab_size or (rows > tok.vocab_size and self.marks_eot_trained):
      return TRAINED
    return ABSENT if rows <= tok.eot_id else UNTRAINED

  @property
  def eot_trained(self) -> bool:
    return self.eot_row == TRAINED

  @property
  def usable_rows(self) -> int:
    """Rows with a token of the tokenizer (EOT's only when trained); those past it are padding."""
    tok = self.tokenizer
    return tok.vocab_size if self.eot_trained else tok.base_vocab_size

  def check_vocabulary(self) -> None:
    """Raises ValueError where the tokenizer cannot be this model's (its ids do not fit the rows)."""
    rows, tok = self.model_config.vocab_size, self.tokenizer
    if rows < tok.base_vocab_size or (rows < tok.vocab_size and rows != tok.base_vocab_size):
      raise ValueError(f"{self.path}: the model's vocabulary has {rows} ids but the tokenizer has "
                       f"{tok.base_vocab_size} (+ EOT = {tok.vocab_size}); use the model's own tokenizer")

  def read_params(self, mesh: Mesh | None = None, dtype: str | None = None) -> dict:
    """The parameters, each device reading only its shards of `model.param_shardings` over `mesh`
    (default: all on the first device), in `dtype` (default `model_config.param_dtype`)."""
    config = self.model_config if not dtype else self.model_config.replace(param_dtype=jnp.dtype(dtype).name)
    shardings = _shardings(config, mesh)
    if self.kind == HUGGINGFACE:
      return hf_reader.load_hf_params(self.path, shardings, dtype=config.param_dtype)[0]
    if self.kind == LORA:
      return model_readers.load_merged_params(self.path, shardings, dtype=config.param_dtype)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          model_lib.abstract_params(config), shardings)
    return checkpoint.restore_params(self.path, target)

  def read_params_for_training(self, model_config: model_lib.ModelConfig, mesh: Mesh) -> dict:
    """The weights for fine-tuning `model_config` (the run's vocabulary), with a row for EOT.

    An ABSENT row is appended at the mean (the embedding grown to `model_config.vocab_size`); an
    UNTRAINED one, a padding row, is overwritten with the mean of the tokenizer's rows.
    """
    params = self.read_params(mesh, dtype=model_config.param_dtype)
    base = self.model_config.replace(param_dtype=model_config.param_dtype)
    if base.vocab_size == model_config.vocab_size and self.eot_row != UNTRAINED:
      return params
    # Only the vocabulary tables change; the rest of the model is passed on as read.
    tables = {k: params[k] for k in ("embed", "lm_head") if k in params}
    out_shards = model_lib.param_shardings(lora_lib.base_config(model_config), mesh)
    out_shards = {k: out_shards[k] for k in tables}
    if base.vocab_size != model_config.vocab_size:
      grow = lambda t: vocab_rows.add_eot_row(t, base, model_config.vocab_size)[0]
      return {**params, **jax.jit(grow, out_shardings=out_shards)(tables)}
    tok = self.tokenizer
    metrics.log("model.init_from has %d rows for %d tokenizer ids: EOT (id %d) gets a fresh row at the "
                "mean of the first %d, over the padding row there", base.vocab_size, tok.vocab_size,
                tok.eot_id, tok.base_vocab_size)
    fresh = lambda t: vocab_rows.set_rows_to_mean(t, (tok.eot_id,), tok.base_vocab_size)
    return {**params, **jax.jit(fresh, out_shardings=out_shards, donate_argnums=0)(tables)}


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


def declares_eot(directory, tok: tokenizer_lib.Tokenizer) -> bool:
  """True where a Hugging Face directory's tokenizer_config.json names the EOT text at its id, as a
  lima_jax export of a fine-tuned model writes it: the row there is trained."""
  file = paths.path(directory) / tokenizer_lib.HF_CONFIG_FILE
  if not file.is_file():
    return False
  try:
    decoder = json.loads(file.read_text()).get("added_tokens_decoder") or {}
  except (OSError, ValueError):
    return False
  return (decoder.get(str(tok.eot_id)) or {}).get("content") == tok.eot_text


def open_model(path: str | os.PathLike, *, dtype: str | None = None,
               tokenizer: tokenizer_lib.Tokenizer | None = None, tokenizer_path: str | None = None,
               eot: str = tokenizer_lib.DEFAULT_EOT) -> ModelSource:
  """Opens a Hugging Face directory, a lima_jax checkpoint (step or workdir) or a LoRA checkpoint.

  Reads configs and headers, no weights. `dtype` sets the parameter and compute dtype (default:
  the checkpoint's; float32 for Hugging Face). The tokenizer is `tokenizer`, else the one at
  `tokenizer_path` (with `eot`), else the source's own. Raises FileNotFoundError for a path that
  is neither kind, naming the path (the caller names its flag).
  """
  path = paths.path(path)
  if tokenizer is None and tokenizer_path:
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path, eot=eot)
  if checkpoint.is_hf_dir(path):
    config = _with_dtype(hf_reader.HFCheckpoint(path).model_config, dtype or "float32")
    return ModelSource(path, HUGGINGFACE, config, None, tokenizer, eot)
  try:
    ckpt = checkpoint.resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"neither a Hugging Face directory (no {checkpoint.HF_CONFIG}) nor a "
                            f"lima_jax checkpoint ({e})") from None
  stored = checkpoint.read_model_config(ckpt)
  config = _with_dtype(lora_lib.base_config(stored), dtype)
  return ModelSource(ckpt, LORA if stored.lora is not None else CHECKPOINT, config, stored.lora, tokenizer, eot)
