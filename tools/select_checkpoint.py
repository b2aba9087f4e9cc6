"""`python tools/select_checkpoint.py ...` is `lima-select ...`; the command: lima_jax/cli/select_checkpoint.py."""

from lima_jax.cli import select_checkpoint

if __name__ == "__main__":
  select_checkpoint.run()
