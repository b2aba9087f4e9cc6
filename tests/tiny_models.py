"""Tiny random lima_jax checkpoints with the bundled tokenizer, for tests that need a real model."""

import jax

from lima_jax import checkpoint
from lima_jax import data as data_lib
from lima_jax import model as model_lib
from lima_jax import tokenizer as tokenizer_lib


def save_tiny_checkpoint(path, *, scale: float = 20.0, seed: int = 0, max_seq_len: int = 2048) -> str:
  """A 2-layer model (weights times `scale`: peaked, so answers are not uniform noise) at `path`."""
  tok = tokenizer_lib.load_tokenizer(data_lib.bundled_paths()["tokenizer"])
  cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, mlp_dim=64,
                              max_seq_len=max_seq_len)
  params = jax.tree.map(lambda x: x * scale, model_lib.init_params(cfg, jax.random.key(seed)))
  checkpoint.save_model(path, params, cfg, tok.to_blob())
  return str(path)


def byte_level_bpe(corpus: str, specials, vocab_size: int = 300):
  """A small LLaMA-3-like byte-level BPE `tokenizers.Tokenizer` trained on `corpus`, with `specials`
  added after the learned pieces."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([corpus] * 20, trainer)
  tok.add_special_tokens(list(specials))
  return tok
