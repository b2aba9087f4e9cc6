"""`python tools/chat.py ...` is `lima-chat ...`; the command: lima_jax/cli/chat.py."""

from lima_jax.cli import chat

if __name__ == "__main__":
  chat.run()
