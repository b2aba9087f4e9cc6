"""`python tools/judge.py ...` is `lima-judge ...`; the command: lima_jax/cli/judge.py."""

from lima_jax.cli import judge

if __name__ == "__main__":
  judge.run()
