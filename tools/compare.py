"""`python tools/compare.py ...` is `lima-compare ...`; the command: lima_jax/cli/compare.py."""

from lima_jax.cli import compare

if __name__ == "__main__":
  compare.run()
