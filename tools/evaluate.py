"""`python tools/evaluate.py ...` is `lima-evaluate ...`; the command: lima_jax/cli/evaluate.py."""

from lima_jax.cli import evaluate

if __name__ == "__main__":
  evaluate.run()
