"""`python tools/annotate.py ...` is `lima-annotate ...`; the command: lima_jax/cli/annotate.py."""

from lima_jax.cli import annotate

if __name__ == "__main__":
  annotate.run()
