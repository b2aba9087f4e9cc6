"""`lima-train` / `python -m lima_jax.train`: fine-tune with a preset, `--config=7b --workdir=DIR`."""

from absl import flags

from lima_jax.cli import common

DEFAULT_CONFIG = "tiny"


def define_flags() -> None:
  common.define_config_flag(
      DEFAULT_CONFIG, "A preset (tiny, 7b, 13b, 33b, 65b) or a config file, e.g. configs/lima.py:7b; "
      "override fields with --config.a.b=v.")
  flags.DEFINE_string("workdir", None, "Run directory (local or gs://); default ./workdir/<preset>.")


def main(argv) -> None:
  from lima_jax import train  # pylint: disable=g-import-not-at-top  # jax: after the process set-up.
  train.main(argv)


def run() -> None:
  common.run(main, define_flags, default_config=DEFAULT_CONFIG, cpu_allocator=True)


if __name__ == "__main__":
  run()
