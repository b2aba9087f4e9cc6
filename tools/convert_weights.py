"""`python tools/convert_weights.py ...` is `lima-convert ...`; the command: lima_jax/cli/."""

from lima_jax.cli import convert_weights

if __name__ == "__main__":
  convert_weights.run()
