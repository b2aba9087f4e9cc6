r"""Talk to a model in the terminal, multi-turn, with LIMA's decoding.

  python tools/chat.py --checkpoint WORKDIR_OR_CKPT_OR_HF_DIR [--greedy] [--max_new_tokens N]
      [--seed S] [--config=configs/lima.py:7b --config.sampling.temperature=0.5 ...]

Each line read from standard input is one user turn; the model's answer follows, and the whole
conversation so far is its context (oldest turns are dropped past the context limit). Commands:
`/reset` starts a new conversation, `/quit` (or end of input) leaves. Reading plain lines makes it
scriptable: `printf 'Hi\n/quit\n' | python tools/chat.py --checkpoint ...`.
After each answer a line in brackets gives the prompt and answer token counts and why it ended.
"""

import sys

from absl import flags

from lima_jax import errors
from lima_jax import inference
from lima_jax import sharding
from lima_jax.cli import common
from lima_jax.cli import decoding as decoding_flags

DEFAULT_CONFIG = "7b"


def chat(loaded, scfg, lines, write) -> int:
  """Runs the conversation over `lines`; returns the number of answers given."""
  turns: list[str] = []
  answers = 0
  write("Type a message; /reset starts over, /quit leaves.\n")
  for line in lines:
    text = line.rstrip("\n")
    command = text.strip()
    if command == "/quit":
      break
    if command == "/reset":
      turns = []
      write("[new conversation]\n")
      continue
    if not command:
      continue
    turns.append(text)
    # Each answer gets its own random stream, so a scripted session is reproducible.
    result = loaded.generate([loaded.prompt_ids(turns)], scfg, prompt_seeds=[answers])[0]
    reply = loaded.tokenizer.decode(result.tokens)
    turns.append(reply)
    answers += 1
    truncated = ", oldest turns dropped" if result.prompt_truncated else ""
    write(f"assistant: {reply}\n[{result.prompt_tokens} prompt tokens, {result.response_tokens} answer "
          f"tokens, {result.finish_reason}{truncated}]\n")
  return answers


def main(argv):

  if len(argv) > 1:
    raise errors.InputError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    scfg = decoding_flags.sampling_config_from_flags(f).replace(batch_size=1)
    mesh = sharding.make_mesh(dict(f.config.mesh))
  except ValueError as e:
    raise errors.InputError(str(e)) from None
  try:
    loaded = inference.load_model(f.checkpoint, mesh=mesh, tokenizer_path=f.tokenizer, dtype=f.dtype)
  except (FileNotFoundError, ValueError) as e:
    raise errors.InputError(f"--checkpoint {f.checkpoint}: {e}") from None
  for note in loaded.notes:
    print(f"note: {note}", file=sys.stderr)
  if scfg.max_len > loaded.model_config.max_seq_len:
    scfg = scfg.replace(max_len=loaded.model_config.max_seq_len, max_prompt_len=0)

  def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()

  chat(loaded, scfg, sys.stdin, write)


def define_flags() -> None:

  decoding_flags.define_decoding_flags(DEFAULT_CONFIG)
  flags.mark_flags_as_required(["checkpoint"])


def main_or_quit(argv):
  try:
    main(argv)
  except KeyboardInterrupt:
    print()


def run() -> None:
  common.run(main_or_quit, define_flags, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
