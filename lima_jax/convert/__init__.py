"""Hugging Face LLaMA, Mistral, Qwen2 and Qwen3 checkpoints <-> lima_jax parameters, streamed;
and `load_pretrained`. The public names of the package's modules, one concept each:

  hf_config      config.json / generation_config.json <-> ModelConfig; ConversionError
  param_names    the per-parameter map between the layouts (names, shapes, axis order)
  hf_reader      a Hugging Face directory, checked and read a block at a time; load_hf_params
  orbax_stream   lima_jax checkpoints written and opened one chunk at a time
  model_readers  blocks of any loadable model, LoRA checkpoints merged into their base
  vocab_rows     rows for new tokens (EOT) at the mean of the old ones
  import_hf      hf_to_orbax
  export_hf      orbax_to_hf
  pretrained     load_pretrained

Every map is a transpose and a reshape (PyTorch's Linear stores [out, in]); Hugging Face already
keeps q/k in the half-split rotary layout the model uses, so no permutation is needed and the
round trip is bit-exact. Nothing here holds a whole model on one host unless asked to.
"""

from lima_jax.convert.export_hf import orbax_to_hf
from lima_jax.convert.hf_config import ARCHITECTURE
from lima_jax.convert.hf_config import ARCHITECTURES
from lima_jax.convert.hf_config import CONFIG_FILE
from lima_jax.convert.hf_config import ConversionError
from lima_jax.convert.hf_config import describe
from lima_jax.convert.hf_config import DTYPES
from lima_jax.convert.hf_config import GENERATION_CONFIG_FILE
from lima_jax.convert.hf_config import generation_config
from lima_jax.convert.hf_config import hf_config_to_model_config
from lima_jax.convert.hf_config import INDEX_FILE
from lima_jax.convert.hf_config import LIMA_GENERATION
from lima_jax.convert.hf_config import model_config_to_hf_config
from lima_jax.convert.hf_config import SINGLE_FILE
from lima_jax.convert.hf_config import SPECIAL_TOKENS_KEY
from lima_jax.convert.hf_reader import HFCheckpoint
from lima_jax.convert.hf_reader import load_hf_params
from lima_jax.convert.import_hf import hf_to_orbax
from lima_jax.convert.model_readers import load_merged_params
from lima_jax.convert.orbax_stream import open_params
from lima_jax.convert.param_names import cast
from lima_jax.convert.param_names import hf_tensor_order
from lima_jax.convert.param_names import param_maps
from lima_jax.convert.param_names import ParamMap
from lima_jax.convert.param_names import transpose_2d
from lima_jax.convert.pretrained import load_pretrained
from lima_jax.convert.vocab_rows import add_eot_row
from lima_jax.convert.vocab_rows import set_rows_to_mean

__all__ = [
    "add_eot_row",
    "ARCHITECTURE",
    "ARCHITECTURES",
    "cast",
    "CONFIG_FILE",
    "ConversionError",
    "describe",
    "DTYPES",
    "generation_config",
    "GENERATION_CONFIG_FILE",
    "hf_config_to_model_config",
    "hf_tensor_order",
    "hf_to_orbax",
    "HFCheckpoint",
    "INDEX_FILE",
    "LIMA_GENERATION",
    "load_hf_params",
    "load_merged_params",
    "load_pretrained",
    "model_config_to_hf_config",
    "open_params",
    "orbax_to_hf",
    "param_maps",
    "ParamMap",
    "set_rows_to_mean",
    "SINGLE_FILE",
    "SPECIAL_TOKENS_KEY",
    "transpose_2d",
]
