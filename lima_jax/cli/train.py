"""`lima-train` / `python -m lima_jax.train`: fine-tune a model the LIMA way, or resume a run.

  lima-train --config=cpu --config.model.init_from=DIR --workdir=runs/smol   # a small model, CPU
  lima-train --config=7b --config.model.init_from=gs://B/llama-7b --workdir=gs://B/runs/7b
  lima-train --config=cpu --config.optimizer.lr=2e-5 --print_config        # every field, resolved

A preset sets every field (docs/training.md explains them); `--config.SECTION.FIELD=VALUE`
overrides one. Rerun the same command to resume: the workdir keeps the run's config
(run_config.json) and refuses a rerun of another model or recipe in one line.
"""

from absl import flags

from lima_jax.cli import common

DEFAULT_CONFIG = "tiny"


def define_flags() -> None:
  common.define_config_flag(DEFAULT_CONFIG, "A preset or a config file, e.g. configs/lima.py:7b")
  flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, "
                      "run_config.json; default ./workdir/<preset>.")


def main(argv) -> None:
  from lima_jax import train  # pylint: disable=g-import-not-at-top  # jax: after the process set-up.
  train.main(argv)


def run() -> None:
  common.run(main, define_flags, default_config=DEFAULT_CONFIG, cpu_allocator=True)


if __name__ == "__main__":
  run()
