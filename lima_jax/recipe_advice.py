"""Warnings about a run's recipe that a user would rather hear before the first step than after.

Each is a mismatch the run itself would never report: a random-init lr brought to a pretrained
model, a batch larger than the data (one step an epoch, mostly empty rows), a preset sized for
pretrained weights that starts from random ones. They warn rather than refuse: each can be what
the user means.
"""

from lima_jax import metrics as metrics_lib

# Above this, full fine-tuning lr is a random-init lr (the tiny preset's 1e-3); LIMA uses 1e-5.
PRETRAINED_LR_LIMIT = 1e-4
# Random init of more parameters than this is no trial run (the tiny preset has ~0.4M).
RANDOM_INIT_PARAMS_LIMIT = 100e6


def lr_warning(config) -> str | None:
  lr, lora = float(config.optimizer.lr), int(config.get("lora", {}).get("rank", 0) or 0)
  if not config.model.init_from or lora > 0 or lr < PRETRAINED_LR_LIMIT:
    return None
  return (f"optimizer.lr={lr:g} is a random-init lr (the {config.get('preset', '')} preset's); "
          f"fine-tuning the pretrained model.init_from with it tends to erase what it learned. LIMA "
          f"uses 1e-5 -> 1e-6: --config=cpu on a CPU host, or --config.optimizer.lr=1e-5 "
          f"--config.optimizer.end_lr=1e-6")


def batch_warning(config, train_rows: int) -> str | None:
  batch = int(config.train.batch_size)
  if batch <= train_rows:
    return None
  what = "packed rows" if config.data.get("packing") else "training conversations"
  return (f"train.batch_size={batch} is more than the {train_rows} {what}: each epoch is one "
          f"optimizer step, {100 * (1 - train_rows / batch):.0f}% of its rows empty; "
          f"--config.train.batch_size={train_rows} or less (or more data) gives more steps")


def random_init_warning(config, num_params: float) -> str | None:
  if config.model.init_from or num_params <= RANDOM_INIT_PARAMS_LIMIT:
    return None
  return (f"model.init_from is empty: training a {num_params / 1e9:.2f}B-parameter "
          f"{config.get('preset', '')} model from random init, which LIMA never does (it fine-tunes a "
          f"pretrained model); set --config.model.init_from=DIR (a Hugging Face directory or a "
          f"lima_jax checkpoint)")


def warnings_for(config, *, train_rows: int, num_params: float) -> list[str]:
  found = (lr_warning(config), batch_warning(config, train_rows),
           random_init_warning(config, num_params))
  return [w for w in found if w]


def warn_about(config, model_config, train_data) -> None:
  """Logs every warning for the run (its model config and training data known)."""
  for warning in warnings_for(config, train_rows=int(train_data.rows),
                              num_params=float(model_config.num_params())):
    metrics_lib.warn("%s", warning)
