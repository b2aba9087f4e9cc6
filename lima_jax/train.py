"""LIMA fine-tuning: `python -m lima_jax.train --config=configs/lima.py:PRESET --workdir=DIR`.

The run's set-up (tokenizer and data first, so bad input stops it before any compile; the mesh;
the model config; pretrained weights; the resume point; which checkpoints to keep) and its loop
(steps, metrics, saves, dev evaluation). The step itself is `lima_jax.train_step`; what differs
on several hosts, `lima_jax.distributed`.
"""

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding

from lima_jax import checkpoint as ckpt_lib
from lima_jax import convert
from lima_jax import data as data_lib
from lima_jax import distributed
from lima_jax import errors
from lima_jax import flops as flops_lib
from lima_jax import hardware
from lima_jax import lora as lora_lib
from lima_jax import memory_fit
from lima_jax import metrics as metrics_lib
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import recipe_advice
from lima_jax import sampling
from lima_jax import sharding
from lima_jax import tokenizer as tokenizer_lib
from lima_jax import train_step
from lima_jax import workdir as workdir_lib


def load_run_tokenizer(config):
  """`data.tokenizer_path`; else the tokenizer of `model.init_from`; else the bundled one."""
  init_from = config.model.init_from
  if config.data.tokenizer_path or not init_from:
    return data_lib.tokenizer_from_config(config.data)
  if ckpt_lib.is_hf_dir(init_from):
    return tokenizer_lib.load_tokenizer(init_from, eot=config.data.eot_token)
  blob = ckpt_lib.read_tokenizer_blob(init_from)
  if blob is None:
    raise FileNotFoundError(f"model.init_from={init_from} carries no tokenizer; set "
                            f"--config.data.tokenizer_path")
  return tokenizer_lib.load_tokenizer_from_blob(blob)


class RunData:
  """What the run reads before any weight or compile: tokenizer, train loader, dev sets."""

  def __init__(self, config):
    try:
      self.tokenizer = load_run_tokenizer(config)
      self.train = data_lib.make_train_loader(
          config.data, self.tokenizer, global_batch_size=int(config.train.batch_size),
          seed=int(config.data.shuffle_seed), num_epochs=int(config.train.epochs))
      self.dev = None
      self.dev_prompts: list[tuple[str, ...]] = []
      if config.data.dev_path or config.data.tfds_name or not config.data.train_path:
        self.dev = data_lib.make_eval_batches(config.data, self.tokenizer,
                                              global_batch_size=int(config.train.batch_size))
        conversations = data_lib.load_conversations(config.data, "dev")
        self.dev_prompts = [c.prompt_turns for c in conversations[:int(config.train.dev_generations)]]
        self.dev_prompt_ids = [data_lib.tokenize_prompt(self.tokenizer, turns).tolist()
                               for turns in self.dev_prompts]
    except (FileNotFoundError, ValueError) as e:  # records.DataError is a ValueError.
      raise errors.InputError(str(e)) from e


def run_mesh(config, devices=None) -> Mesh:
  """The training mesh: `config.mesh` as given, or (left at its default) the one that
  `hardware.mesh_for` picks for the batch, which is also the mesh `tools/aot_compile.py`
  compiles. Across several TPU slices the data axis spans the slices (data-center network).
  """
  devices = list(jax.devices() if devices is None else devices)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  sizes = hardware.mesh_for(config.mesh, len(devices), int(config.train.batch_size),
                            int(config.data.max_len), num_slices)
  if num_slices == 1:
    return sharding.make_mesh(sizes, devices)
  shape = sharding.mesh_shape(sizes, len(devices))
  if shape[0] % num_slices:
    raise ValueError(f"config.mesh.data={shape[0]} must be a multiple of the {num_slices} slices: "
                     f"the data axis is the one that crosses slices")
  ici = (shape[0] // num_slices,) + tuple(shape[1:])
  dcn = (num_slices,) + (1,) * (len(shape) - 1)
  array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return Mesh(np.asarray(array), sharding.MESH_AXES)


def build_model_config(config, tokenizer) -> model_lib.ModelConfig:
  """`config.model` with the vocabulary of the run's tokenizer, or a pretrained model's shapes.

  Starting from pretrained weights, the architecture is the checkpoint's; `config.model` still
  sets how it runs (dtypes, scan, remat, dropout, attention kernel). With `config.lora.rank` > 0
  the config also names the adapters, the rows that train (those the base lacks: EOT) and the
  base they adapt, and the base weights are held in `lora.base_dtype`.
  """
  fields = dict(config.model)
  init_from = config.model.init_from
  if init_from:
    base = (convert.hf_config_to_model_config(init_from) if ckpt_lib.is_hf_dir(init_from)
            else lora_lib.base_config(ckpt_lib.read_model_config(init_from)))
    runtime = ("param_dtype", "dtype", "scan_layers", "remat_policy", "residual_dropout", "attention")
    fields = {**base.to_dict(), **{k: fields[k] for k in runtime}}
    fields["vocab_size"] = max(base.vocab_size, tokenizer.vocab_size)
    base_vocab = base.vocab_size
  else:
    fields["vocab_size"] = tokenizer.vocab_size
    base_vocab = tokenizer.vocab_size
  lora_section = config.get("lora")
  fields["lora"] = lora_lib.from_run_config(
      lora_section, base_vocab_size=base_vocab, vocab_size=fields["vocab_size"],
      eot_id=tokenizer.eot_id, base=_absolute(init_from), base_seed=int(config.train.seed))
  if fields["lora"] is not None:
    fields["param_dtype"] = str(lora_section.get("base_dtype", "bfloat16"))
  max_len, max_seq_len = int(config.data.max_len), int(fields["max_seq_len"])
  if max_len > max_seq_len:
    if init_from:
      raise errors.InputError(
          f"data.max_len={max_len} is longer than the pretrained model's context: model.init_from="
          f"{init_from} has max_position_embeddings={max_seq_len}, and lima_jax does not "
          f"extrapolate RoPE; set --config.data.max_len={max_seq_len} (or less)")
    raise errors.InputError(
        f"data.max_len={max_len} is longer than model.max_seq_len={max_seq_len} (RoPE would run "
        f"past the positions the model is made for); set --config.data.max_len={max_seq_len} or "
        f"--config.model.max_seq_len={max_len}")
  return model_lib.ModelConfig.from_dict(fields)


def _absolute(path: str) -> str:
  """A local path made absolute (an adapter checkpoint names its base from anywhere); URLs as given."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _declares_eot(init_from: str, tokenizer) -> bool:
  """True where a Hugging Face directory's tokenizer_config.json names the EOT text at its id,
  as a lima_jax export (tools/convert_weights.py orbax-to-hf) writes it: the row is trained."""
  config_file = paths.path(init_from) / tokenizer_lib.HF_CONFIG_FILE
  if not config_file.is_file():
    return False
  try:
    decoder = json.loads(config_file.read_text()).get("added_tokens_decoder") or {}
  except (OSError, ValueError):
    return False
  entry = decoder.get(str(tokenizer.eot_id)) or {}
  return entry.get("content") == tokenizer.eot_text


def needs_fresh_eot_row(init_from: str, base_vocab_size: int, tokenizer) -> bool:
  """True where the pretrained rows already cover the EOT id but none of them is EOT's own.

  Models that pad their embedding past the tokenizer (e.g. 32064 rows for 32000 pieces) put
  EOT's id (the tokenizer's size) on a padding row. A lima_jax training checkpoint, or a model
  whose rows end exactly at EOT, or an export that declares EOT, already trained that row.
  """
  eot = tokenizer.eot_id
  if base_vocab_size <= eot or base_vocab_size == tokenizer.vocab_size:
    return False
  if ckpt_lib.is_hf_dir(init_from):
    return not _declares_eot(init_from, tokenizer)
  return not (ckpt_lib.resolve(init_from) / ckpt_lib.TRAIN_STATE).is_dir()


def load_pretrained_params(config, model_config: model_lib.ModelConfig, mesh: Mesh, tokenizer=None):
  """Pretrained weights read straight into their shards, with a row for EOT at the mean.

  EOT gets a fresh row: appended where the embedding ends before its id, or, where the
  embedding is padded past the tokenizer (`needs_fresh_eot_row`; needs `tokenizer`), the
  padding row at its id overwritten with the mean of the tokenizer's rows.
  """
  init_from = config.model.init_from
  if ckpt_lib.is_hf_dir(init_from):
    base = convert.hf_config_to_model_config(init_from)
  else:
    base = ckpt_lib.read_model_config(init_from)
  saved_lora = base.lora
  base = lora_lib.base_config(base).replace(param_dtype=model_config.param_dtype)
  base_shards = model_lib.param_shardings(base, mesh)
  if ckpt_lib.is_hf_dir(init_from):
    params, _ = convert.load_hf_params(init_from, base_shards, dtype=model_config.param_dtype)
  elif saved_lora is not None:  # An adapter checkpoint: its base with the adapters merged in.
    params = convert.load_merged_params(init_from, base_shards, dtype=model_config.param_dtype)
  else:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          model_lib.abstract_params(base), base_shards)
    params = ckpt_lib.restore_params(init_from, target)
  if base.vocab_size == model_config.vocab_size:
    if tokenizer is None or not needs_fresh_eot_row(init_from, base.vocab_size, tokenizer):
      return params
    metrics_lib.log("model.init_from has %d rows for %d tokenizer ids: EOT (id %d) gets a fresh row at the "
         "mean of the first %d, over the padding row there", base.vocab_size, tokenizer.vocab_size,
         tokenizer.eot_id, tokenizer.base_vocab_size)
    fresh = lambda p: convert.set_rows_to_mean(p, (tokenizer.eot_id,), tokenizer.base_vocab_size)
    return jax.jit(fresh, out_shardings=model_lib.param_shardings(lora_lib.base_config(model_config), mesh),
                   donate_argnums=0)(params)
  grow = lambda p: convert.add_eot_row(p, base, model_config.vocab_size)[0]
  out_shards = model_lib.param_shardings(lora_lib.base_config(model_config), mesh)
  return jax.jit(grow, out_shardings=out_shards, donate_argnums=0)(params)


def _lora_base(config, model_config: model_lib.ModelConfig, mesh: Mesh):
  """A LoRA run's frozen base, re-read on resume (the checkpoints hold only the adapters); None
  for full fine-tuning."""
  if not lora_lib.enabled(model_config):
    return None
  if config.model.init_from:
    return load_pretrained_params(config, model_config, mesh)
  base = lora_lib.base_config(model_config)
  return jax.jit(lambda: model_lib.lora_base_params(model_config, model_config.lora.base_seed),
                 out_shardings=model_lib.param_shardings(base, mesh))()


def _host_array(value, sharding_: NamedSharding) -> jax.Array:
  """A global array from a host value that every process holds identically."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def generate_dev_responses(config, model_config, params, mesh, run_data: RunData) -> list[dict]:
  """Answers the first `train.dev_generations` dev prompts with the run's decoding settings."""
  if not run_data.dev_prompts:
    return []
  scfg = sampling.SamplingConfig.from_dict(dict(config.sampling)).replace(
      max_new_tokens=int(config.train.dev_max_new_tokens))
  tok = run_data.tokenizer
  stop_ids = sorted({tok.eot_id, tok.eos_id} - {None})
  model_config, params = sampling.without_padding_rows(model_config, params, tok.vocab_size, mesh)
  results = sampling.generate(model_config, params, run_data.dev_prompt_ids, sampling_config=scfg,
                              stop_ids=stop_ids, pad_id=tok.pad_id, bos_id=tok.bos_id, mesh=mesh)
  return [{"index": i, "conversation": list(turns), "response": tok.decode(r.tokens),
           "finish_reason": r.finish_reason, "response_tokens": r.response_tokens}
          for i, (turns, r) in enumerate(zip(run_data.dev_prompts, results))]


def evaluate_dev(eval_step, params, run_data: RunData, mesh: Mesh, spec) -> dict[str, float]:
  if run_data.dev is None:
    return {}
  total, count = 0.0, 0.0
  for local in run_data.dev.batches:
    loss_sum, n = eval_step(params, data_lib.to_global_batch(local, mesh, spec))
    total += float(loss_sum)
    count += float(n)
  loss = total / max(count, 1.0)
  return {"dev_loss": loss, "dev_perplexity": math.exp(min(loss, 80.0))}


def parse_epochs(spec: str, field: str = "train.keep_epochs") -> frozenset[int] | None:
  """"5-10" or "5,8,10" (or a mix, "1,5-10") -> those epoch numbers; "" -> None (all)."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  epochs = set()
  try:
    for part in spec.split(","):
      first, dash, last = part.strip().partition("-")
      first, last = int(first), int(last if dash else first)
      if first < 1 or last < first:
        raise ValueError(part)
      epochs.update(range(first, last + 1))
  except ValueError:
    raise errors.InputError(f"{field}={spec!r}: expected epoch numbers from 1 as ranges and lists, e.g. "
                      f"\"5-10\" or \"5,8,10\" (\"\" keeps every epoch)") from None
  return frozenset(epochs)


def superseded_steps(finished: list[int], keep_epochs: frozenset[int] | None,
                     steps_per_epoch: int) -> list[int]:
  """Finished steps to delete under `train.keep_epochs`: all but the newest (the resume point)
  that are not the end of a kept epoch (periodic and preemption saves included)."""
  if keep_epochs is None or not finished:
    return []
  kept = lambda s: s % steps_per_epoch == 0 and s // steps_per_epoch in keep_epochs
  return [s for s in finished[:-1] if not kept(s)]


def resume_state(config, model_config, mesh: Mesh, manager, run_data: RunData,
                 total_steps: int) -> train_step.TrainState | None:
  """The state of the newest step in the workdir that an exact resume can start from, or None.

  A step resumes exactly only with its `opt_state/`; with `train.keep_optimizer_state=latest`
  older steps keep only their parameters. Steps newer than the newest resumable one are named
  in the log and redone. Where no step keeps an optimizer state at all (e.g. it was deleted by
  hand), the run continues from the newest parameters with fresh AdamW moments (their step
  counters, hence the lr schedule, continue) and the log says that this is not exact.
  """
  finished = ckpt_lib.finished_steps(manager)
  if not finished:
    return None
  resumable = ckpt_lib.resumable_steps(manager)
  rep = train_step.replicated(mesh)
  abstract = train_step.abstract_train_state(config, model_config, mesh, total_steps)
  step = resumable[-1] if resumable else finished[-1]
  params, opt_state, meta = ckpt_lib.restore_training(
      manager, step, params_target=abstract.params,
      opt_state_target=abstract.opt_state if resumable else None)
  if opt_state is None:
    metrics_lib.warn("no checkpoint in %s keeps its optimizer state (opt_state/); continuing from step %d's "
          "parameters with fresh AdamW moments: NOT an exact resume", manager.directory, step)
    fresh = jax.jit(train_step.optimizer(config, total_steps).init,
                    out_shardings=train_step.state_shardings(abstract).opt_state)(params)
    opt_state = _with_step_counts(fresh, int(meta["step"]))
  elif step != finished[-1]:
    metrics_lib.warn("steps %s keep no optimizer state; resuming exactly from step %d, the newest that does, "
          "and training the later steps again", [s for s in finished if s > step], step)
  rng = np.asarray(meta["rng"], train_step.key_data_struct().dtype)
  state = train_step.TrainState(step=_host_array(np.int32(meta["step"]), rep), params=params,
                     opt_state=opt_state, rng=_host_array(rng, rep),
                     frozen=_lora_base(config, model_config, mesh))
  run_data.train.set_state(meta["data"])
  differences = workdir_lib.config_differences(meta.get("config", {}), workdir_lib.json_config(config))
  metrics_lib.log("resumed from %s at step %d", manager.directory / str(step), meta["step"])
  if differences:
    metrics_lib.log("the config differs from the checkpoint's: %s", "; ".join(differences))
  return state


def _with_step_counts(opt_state, step: int):
  """The optimizer state with every step counter (optax's `count` fields) set to `step`."""
  def set_count(path, leaf):
    if path and getattr(path[-1], "name", None) == "count":
      return _host_array(np.asarray(step, leaf.dtype), leaf.sharding)
    return leaf
  return jax.tree_util.tree_map_with_path(set_count, opt_state)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the job in `workdir`; returns a summary (final step, losses, why it ended)."""

  workdir = paths.path(workdir)
  distributed.set_resume_hint(workdir=str(workdir))
  distributed.maybe_initialize_distributed(config)
  workdir_lib.prepare(workdir, config)  # Refuses a workdir of another model or recipe, in one line.
  keep_opt = str(config.train.get("keep_optimizer_state", "latest"))
  if keep_opt not in ckpt_lib.KEEP_OPTIMIZER_STATE:
    raise errors.InputError(f"train.keep_optimizer_state={keep_opt!r}; expected one of "
                      f"{', '.join(ckpt_lib.KEEP_OPTIMIZER_STATE)}")
  keep_epochs = parse_epochs(config.train.get("keep_epochs", ""))
  run_data = RunData(config)  # Bad data stops the run here, before any compile or weight load.
  steps_per_epoch = run_data.train.steps_per_epoch
  total_steps = int(config.train.epochs) * steps_per_epoch
  if config.train.max_steps:
    total_steps = min(total_steps, int(config.train.max_steps))
  metrics_lib.log("data: %s", run_data.train.stats.summary())
  metrics_lib.log("%d steps per epoch, %d epochs, %d optimizer steps of %d conversations", steps_per_epoch,
       config.train.epochs, total_steps, config.train.batch_size)
  done = workdir_lib.finished_step(workdir, total_steps)
  if done is not None:
    metrics_lib.log("already finished: %s holds step %d of %d; nothing to do (another --workdir starts a "
         "new run)", workdir / ckpt_lib.CHECKPOINTS_SUBDIR, done, total_steps)
    return {"start_step": done, "total_steps": total_steps, "losses": [], "final_step": done,
            "ended": "finished"}

  mesh = run_mesh(config)
  model_config = build_model_config(config, run_data.tokenizer)
  metrics_lib.log("mesh %s over %d devices (%d processes); model %.1fM parameters",
       dict(mesh.shape), mesh.size, jax.process_count(), model_config.num_params() / 1e6)
  recipe_advice.warn_about(config, model_config, run_data.train)
  if lora_lib.enabled(model_config):
    metrics_lib.log("LoRA rank %d on %s: %.2fM trainable parameters, base frozen in %s (%s)",
         model_config.lora.rank, ",".join(model_config.lora.targets),
         lora_lib.num_trainable(model_config) / 1e6, model_config.param_dtype,
         model_config.lora.base or f"random init, seed {model_config.lora.base_seed}")
  step_fn, shards, b_shards = train_step.make_train_step(config, model_config, mesh, total_steps)
  memory_fit.check_train_step(step_fn, train_step.abstract_train_state(config, model_config, mesh, total_steps),
                              train_step.abstract_batch(config, mesh), config, mesh)
  batch_spec = next(iter(b_shards.values())).spec
  eval_step = train_step.make_eval_step(model_config, mesh, model_lib.param_shardings(model_config, mesh), b_shards)

  manager = ckpt_lib.checkpoint_manager(workdir, keep=int(config.train.keep_checkpoints))
  state = resume_state(config, model_config, mesh, manager, run_data, total_steps)
  if state is None:
    params = (load_pretrained_params(config, model_config, mesh, run_data.tokenizer)
              if config.model.init_from else None)
    state = train_step.init_train_state(config, model_config, mesh, int(config.train.seed), params, total_steps)
  start_step = int(jax.device_get(state.step))

  def prune() -> None:
    """Drops what no committed newer step needs: the optimizer state of older steps (by
    default), and the steps `train.keep_epochs` leaves out. Runs with no save in flight."""
    if keep_opt == "latest":
      pruned = ckpt_lib.prune_optimizer_state(manager)
      if pruned:
        logging.info("deleted opt_state/ of steps %s (train.keep_optimizer_state=latest)", pruned)
    for step in superseded_steps(ckpt_lib.finished_steps(manager), keep_epochs, steps_per_epoch):
      manager.delete(step)  # Every process calls it (Orbax syncs them); process 0 deletes.
      logging.info("deleted checkpoint %d (not an epoch in train.keep_epochs)", step)

  def save(step: int) -> None:
    meta = {"step": step, "epoch": step / steps_per_epoch,
            "rng": np.asarray(jax.device_get(state.rng)).tolist(),
            "data": run_data.train.get_state(), "config": workdir_lib.json_config(config),
            "total_steps": total_steps, "mesh": dict(mesh.shape)}
    # Orbax would wait for the previous save here anyway; once it is committed, the state
    # before it is no longer needed to resume.
    manager.wait_until_finished()
    prune()
    if ckpt_lib.save_training(manager, step, params=state.params, opt_state=state.opt_state,
                              model_config=model_config, tokenizer_blob=run_data.tokenizer.to_blob(),
                              train_state=meta):
      distributed.set_resume_hint(saved_step=step)
      metrics_lib.log("saving checkpoint %s", manager.directory / str(step))

  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
  peak, peak_source = metrics_lib.peak_flops(float(config.train.peak_flops_per_device))
  metrics_lib.log("peak FLOP/s per device for MFU: %.3g (%s)", peak, peak_source)
  batch_size, max_len = int(config.train.batch_size), int(config.data.max_len)
  stop = distributed.StopSignal()
  bar = metrics_lib.ProgressBar(total_steps, start_step)
  summary: dict[str, Any] = {"start_step": start_step, "total_steps": total_steps, "losses": []}
  ended = "finished"
  compile_start = time.perf_counter()
  compiled_step = step_fn.lower(state, train_step.abstract_batch(config, mesh)).compile()
  metrics_lib.log("compiled the train step in %.1f s", time.perf_counter() - compile_start)
  distributed.wait_for_all_processes("train_step_compiled")
  last = time.perf_counter()
  epoch_tokens = [0.0, 0.0]  # Non-pad tokens and all positions of the epoch's batches so far.
  try:
    step = start_step
    while step < total_steps:
      epoch, local_batch = next(run_data.train)
      batch = data_lib.to_global_batch(local_batch, mesh, batch_spec)
      try:
        state, step_metrics = compiled_step(state, batch)
        step_metrics = jax.device_get(step_metrics)
      except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1 and distributed.looks_like_lost_peer(e):
          distributed.peer_lost(str(e))
        raise
      step += 1
      now = time.perf_counter()
      step_time, last = now - last, now
      loss = float(step_metrics["loss"])
      summary["losses"].append(loss)
      tokens = float(step_metrics["tokens"])
      epoch_tokens = [epoch_tokens[0] + tokens, epoch_tokens[1] + batch_size * max_len]
      if step % int(config.train.log_every_steps) == 0 or step == total_steps:
        # MFU and tokens/s count only real tokens (and attention within each real sequence);
        # HFU counts the padded program the chips run.
        flops = flops_lib.train_flops(model_config, batch_size, max_len, tokens=tokens,
                                attended=float(step_metrics["attended"]))
        writer.write(step, {
            "loss": loss, "lr": step_metrics["lr"], "grad_norm": step_metrics["grad_norm"],
            "epoch": step / steps_per_epoch, "step_time_s": step_time,
            "tokens_per_s": tokens / step_time,
            "padding_share": 1.0 - tokens / (batch_size * max_len),
            "mfu": flops["model"] / step_time / (peak * mesh.size) if peak else 0.0,
            "hfu": flops["hardware"] / step_time / (peak * mesh.size) if peak else 0.0})
      bar.update({"epoch": f"{epoch + 1}", "loss": f"{loss:.4f}",
                  "lr": f"{float(step_metrics['lr']):.2e}"})
      epoch_end = step % steps_per_epoch == 0
      every = int(config.train.checkpoint_every_steps)
      periodic = every > 0 and step % every == 0
      preempted = stop.should_stop(step)
      stopping = preempted or step == int(config.train.get("stop_at_step", 0))
      if epoch_end or periodic or stopping or step == total_steps:
        writer.flush()  # metrics.jsonl covers every step a resume from this checkpoint keeps.
        save(step)
      if epoch_end:
        padding = 1.0 - epoch_tokens[0] / max(epoch_tokens[1], 1.0)
        writer.write(step, {"epoch_padding_share": padding})
        metrics_lib.log("epoch %d: %.1f%% of the batch positions were padding (MFU and tokens/s leave them out)",
             step // steps_per_epoch, 100 * padding)
        epoch_tokens = [0.0, 0.0]
      if epoch_end and not preempted:  # A preempted host has seconds left: only the save counts.
        done = step // steps_per_epoch
        dev = evaluate_dev(eval_step, train_step.full_params(model_config, state), run_data, mesh, batch_spec)
        if dev:
          writer.write(step, dev, flush=True)
          metrics_lib.log("epoch %d: dev loss %.4f, perplexity %.2f", done, dev["dev_loss"], dev["dev_perplexity"])
        summary.update(dev)
        generations = generate_dev_responses(config, model_config, train_step.full_params(model_config, state),
                                             mesh, run_data)
        if generations and jax.process_index() == 0:
          records = [{"epoch": done, "step": step, **g} for g in generations]
          (workdir / "dev_generations").mkdir(parents=True, exist_ok=True)
          paths.write_text_atomic(workdir / "dev_generations" / f"epoch_{done}.jsonl",
                                  "".join(json.dumps(r) + "\n" for r in records))
        summary["generations"] = generations
        last = time.perf_counter()  # Evaluation time is not step time.
      if stopping:
        ended = "stopped"
        break
  finally:
    bar.close()
    manager.wait_until_finished()
    prune()
    manager.close()
    writer.close()
    stop.restore()
  summary.update(final_step=step, ended=ended, state=state, model_config=model_config)
  metrics_lib.log("%s at step %d of %d; checkpoints in %s", ended, step, total_steps, manager.directory)
  return summary


def main(argv) -> None:
  """The command's body; `lima_jax.cli.train` defines its flags (--config, --workdir) and runs it."""
  del argv
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("workdir", config.preset)
  distributed.report_abnormal_ends()
  try:
    summary = train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      for g in summary.get("generations", []):
        print(f"\n### dev prompt {g['index']}: {g['conversation'][-1]}\n{g['response']}")
  finally:
    # Leave the job here rather than at interpreter exit, so that an abort in the shutdown
    # barrier (a peer died meanwhile) still leaves the watcher to explain it.
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()
    distributed.orderly_exit()


if __name__ == "__main__":
  # Run as a script this file is `__main__`, not the library module `lima_jax.train` (which the
  # command imports after its process set-up): no library module imports the command line.
  from lima_jax.cli import train as train_cli  # pylint: disable=g-import-not-at-top
  train_cli.run()
