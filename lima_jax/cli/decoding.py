"""The flags lima-evaluate and lima-chat share: config, model and decoding shortcuts.

Here, not in `lima_jax.inference`, because flags are the command line's business: the library
never imports the CLI.
"""

from absl import flags

from lima_jax import sampling
from lima_jax.cli import common


def define_decoding_flags(default_config: str) -> None:
  """--config (its sampling and mesh sections are used), --checkpoint and the decoding shortcuts."""
  common.define_config_flag(default_config, "A preset (e.g. 7b) or configs/lima.py:PRESET; its "
                            "sampling and mesh sections are used")
  flags.DEFINE_string("checkpoint", None, "lima_jax checkpoint, training workdir, or Hugging Face directory")
  define_sampling_shortcuts()
  flags.DEFINE_string("tokenizer", None, "tokenizer.model / tokenizer.json (default: the checkpoint's)")
  flags.DEFINE_string("dtype", None, "parameter and compute dtype (default: the checkpoint's)")


def define_sampling_shortcuts() -> None:
  """--greedy, --max_new_tokens and --seed, shorthands for `--config.sampling.*`."""
  flags.DEFINE_bool("greedy", False, "argmax decoding (= --config.sampling.greedy=true)")
  flags.DEFINE_integer("max_new_tokens", None, "= --config.sampling.max_new_tokens")
  flags.DEFINE_integer("seed", None, "= --config.sampling.seed")


def sampling_config_from_flags(flag_values) -> sampling.SamplingConfig:
  """`--config.sampling.*` with the --greedy, --max_new_tokens and --seed shortcuts applied."""
  fields = dict(flag_values.config.sampling)
  if flag_values.greedy:
    fields["greedy"] = True
  if flag_values.max_new_tokens is not None:
    fields["max_new_tokens"] = flag_values.max_new_tokens
  if flag_values.seed is not None:
    fields["seed"] = flag_values.seed
  return sampling.SamplingConfig.from_dict(fields)
