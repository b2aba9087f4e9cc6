"""lima_jax: LIMA fine-tuning of LLaMA-family models in JAX/Flax, from one CPU to TPU pod slices."""

import importlib

__version__ = "0.1.0"

# Public entry points, imported lazily so that `import lima_jax` stays cheap. Importing changes
# nothing in the process: choosing the CPU over an absent TPU is the entry points' job
# (`lima_jax.cli.common.setup_process`).
_LAZY = {
    "load_pretrained": "lima_jax.convert",
    "load_tokenizer": "lima_jax.tokenizer",
    "ModelConfig": "lima_jax.model",
    "Transformer": "lima_jax.model",
}


_SUBMODULES = ("checkpoint", "convert", "data", "distributed", "errors", "flops", "inference", "lora",
               "model", "paths", "records", "sampling", "sharding", "source", "tokenizer", "train", "train_step")


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"lima_jax.{name}")
  raise AttributeError(f"module 'lima_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
