"""`python tools/aot_compile.py ...` is `lima-aot ...`; the command: lima_jax/cli/aot_compile.py."""

from lima_jax.cli import aot_compile

if __name__ == "__main__":
  aot_compile.run()
