"""`python tools/serve.py ...` is `lima-serve ...`; the command: lima_jax/cli/serve.py."""

from lima_jax.cli import serve

if __name__ == "__main__":
  serve.run()
