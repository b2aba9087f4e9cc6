"""LIMA fine-tuning: `python -m lima_jax.train --config=configs/lima.py:PRESET --workdir=DIR`.

`train_and_evaluate` is the run's set-up as a list of single calls (`RunPlan`: what to keep, the
tokenizer and data first, so bad input stops it before any compile; `Trainer`: the mesh, the
model config, pretrained weights or the resume point, the compiled step) and then
`Trainer.run`, the loop of named steps (a step, its metrics, a save when due, the end of an
epoch with dev evaluation, a stop when asked). The step itself is `lima_jax.train_step`; a model
on disk, `lima_jax.source`; what differs on several hosts, `lima_jax.distributed`.
"""

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding

from lima_jax import checkpoint as ckpt_lib
from lima_jax import data as data_lib
from lima_jax import distributed
from lima_jax import errors
from lima_jax import flops as flops_lib
from lima_jax import lora as lora_lib
from lima_jax import memory_fit
from lima_jax import metrics as metrics_lib
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import recipe_advice
from lima_jax import sampling
from lima_jax import sharding
from lima_jax import source as source_lib
from lima_jax import train_step
from lima_jax import workdir as workdir_lib


def load_run_tokenizer(config):
  """`data.tokenizer_path`; else the tokenizer of `model.init_from`; else the bundled one."""
  init_from = config.model.init_from
  if config.data.tokenizer_path or not init_from:
    return data_lib.tokenizer_from_config(config.data)
  try:
    return open_init_from(config).tokenizer
  except ValueError as e:  # A checkpoint that carries no tokenizer.
    raise FileNotFoundError(f"model.init_from={init_from} carries no tokenizer; set "
                            f"--config.data.tokenizer_path") from e


def open_init_from(config, tokenizer=None) -> source_lib.ModelSource:
  """`model.init_from`, opened (no weights read yet); `tokenizer` overrides its own."""
  init_from = config.model.init_from
  try:
    return source_lib.open_model(init_from, tokenizer=tokenizer, eot=config.data.eot_token)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"model.init_from={init_from}: {e}") from None


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
    base = open_init_from(config, tokenizer).model_config
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


def load_pretrained_params(config, model_config: model_lib.ModelConfig, mesh: Mesh, tokenizer=None):
  """`model.init_from`'s weights read straight into their shards, with a row for EOT at the mean
  (`source.ModelSource.read_params_for_training`); `tokenizer` defaults to the run's."""
  opened = open_init_from(config, tokenizer or load_run_tokenizer(config))
  return opened.read_params_for_training(model_config, mesh)


def _lora_base(config, model_config: model_lib.ModelConfig, mesh: Mesh, tokenizer):
  """A LoRA run's frozen base, re-read on resume (the checkpoints hold only the adapters); None
  for full fine-tuning."""
  if not lora_lib.enabled(model_config):
    return None
  if config.model.init_from:
    return load_pretrained_params(config, model_config, mesh, tokenizer)
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
                     frozen=_lora_base(config, model_config, mesh, run_data.tokenizer))
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


class RunPlan:
  """What the run will do, settled before any compile: what to keep, its data, its length."""

  def __init__(self, config):
    self.keep_opt = str(config.train.get("keep_optimizer_state", "latest"))
    if self.keep_opt not in ckpt_lib.KEEP_OPTIMIZER_STATE:
      raise errors.InputError(f"train.keep_optimizer_state={self.keep_opt!r}; expected one of "
                              f"{', '.join(ckpt_lib.KEEP_OPTIMIZER_STATE)}")
    self.keep_epochs = parse_epochs(config.train.get("keep_epochs", ""))
    self.data = RunData(config)  # Bad data stops the run here, before any compile or weight load.
    self.steps_per_epoch = self.data.train.steps_per_epoch
    self.total_steps = int(config.train.epochs) * self.steps_per_epoch
    if config.train.max_steps:
      self.total_steps = min(self.total_steps, int(config.train.max_steps))
    metrics_lib.log("data: %s", self.data.train.stats.summary())
    metrics_lib.log("%d steps per epoch, %d epochs, %d optimizer steps of %d conversations",
                    self.steps_per_epoch, config.train.epochs, self.total_steps, config.train.batch_size)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the job in `workdir`; returns a summary (final step, losses, why it ended).

  Set-up is a list of single calls (each may stop the run in one line), then the loop.
  """
  workdir = paths.path(workdir)
  distributed.set_resume_hint(workdir=str(workdir))
  distributed.maybe_initialize_distributed(config)
  workdir_lib.prepare(workdir, config)  # Refuses a workdir of another model or recipe, in one line.
  plan = RunPlan(config)
  done = workdir_lib.finished_step(workdir, plan.total_steps)
  if done is not None:
    metrics_lib.log("already finished: %s holds step %d of %d; nothing to do (another --workdir starts a "
                    "new run)", workdir / ckpt_lib.CHECKPOINTS_SUBDIR, done, plan.total_steps)
    return {"start_step": done, "total_steps": plan.total_steps, "losses": [], "final_step": done,
            "ended": "finished"}
  trainer = Trainer(config, workdir, plan)
  trainer.compile()
  return trainer.run()


class Trainer:
  """One run's mesh, model, programs, checkpoints and metrics, and its loop of named steps."""

  def __init__(self, config, workdir, plan: RunPlan):
    self.config, self.workdir, self.plan, self.data = config, workdir, plan, plan.data
    self.mesh = sharding.training_mesh(config)
    self.model_config = build_model_config(config, self.data.tokenizer)
    self._log_model()
    recipe_advice.warn_about(config, self.model_config, self.data.train)
    self.step_fn, _, b_shards = train_step.make_train_step(config, self.model_config, self.mesh,
                                                          plan.total_steps)
    # Before any checkpoint is opened or weight loaded: a step that cannot fit stops in one line.
    memory_fit.check_train_step(
        self.step_fn, train_step.abstract_train_state(config, self.model_config, self.mesh, plan.total_steps),
        train_step.abstract_batch(config, self.mesh), config, self.mesh)
    self.batch_spec = next(iter(b_shards.values())).spec
    self.eval_step = train_step.make_eval_step(
        self.model_config, self.mesh, model_lib.param_shardings(self.model_config, self.mesh), b_shards)
    self.manager = ckpt_lib.checkpoint_manager(workdir, keep=int(config.train.keep_checkpoints))
    self.state = self._initial_state()
    self.step = self.start_step = int(jax.device_get(self.state.step))
    self.writer = metrics_lib.MetricWriter(workdir, resume_step=self.start_step)
    self.peak, peak_source = metrics_lib.peak_flops(float(config.train.peak_flops_per_device))
    metrics_lib.log("peak FLOP/s per device for MFU: %.3g (%s)", self.peak, peak_source)
    self.summary: dict[str, Any] = {"start_step": self.start_step, "total_steps": plan.total_steps,
                                    "losses": []}
    self.compiled_step = None
    self.epoch_tokens = [0.0, 0.0]  # Non-pad tokens and all positions of the epoch's batches so far.
    self.stop = distributed.StopSignal()  # From here on, a preemption stops at the next step.

  def _log_model(self) -> None:
    mc = self.model_config
    metrics_lib.log("mesh %s over %d devices (%d processes); model %.1fM parameters",
                    dict(self.mesh.shape), self.mesh.size, jax.process_count(), mc.num_params() / 1e6)
    if lora_lib.enabled(mc):
      metrics_lib.log("LoRA rank %d on %s: %.2fM trainable parameters, base frozen in %s (%s)",
                      mc.lora.rank, ",".join(mc.lora.targets), lora_lib.num_trainable(mc) / 1e6,
                      mc.param_dtype, mc.lora.base or f"random init, seed {mc.lora.base_seed}")

  def _initial_state(self) -> train_step.TrainState:
    """The workdir's resume point, else a fresh state (from `model.init_from` when set)."""
    config, mc, mesh = self.config, self.model_config, self.mesh
    state = resume_state(config, mc, mesh, self.manager, self.data, self.plan.total_steps)
    if state is not None:
      return state
    params = (load_pretrained_params(config, mc, mesh, self.data.tokenizer)
              if config.model.init_from else None)
    return train_step.init_train_state(config, mc, mesh, int(config.train.seed), params,
                                       self.plan.total_steps)

  def compile(self) -> None:
    start = time.perf_counter()
    self.compiled_step = self.step_fn.lower(self.state, train_step.abstract_batch(self.config, self.mesh)).compile()
    metrics_lib.log("compiled the train step in %.1f s", time.perf_counter() - start)
    distributed.wait_for_all_processes("train_step_compiled")

  def run(self) -> dict[str, Any]:
    """The loop: a step, its metrics, a save when due, the end of an epoch, a stop when asked."""
    bar = metrics_lib.ProgressBar(self.plan.total_steps, self.start_step,
                                  every=int(self.config.train.log_every_steps))
    ended, self.last_time = "finished", time.perf_counter()
    try:
      while self.step < self.plan.total_steps:
        epoch, step_metrics = self.train_step()
        self.record(step_metrics)
        bar.update({"epoch": f"{epoch + 1}", "loss": f"{float(step_metrics['loss']):.4f}",
                    "lr": f"{float(step_metrics['lr']):.2e}"})
        preempted = self.stop.should_stop(self.step)
        stopping = preempted or self.step == int(self.config.train.get("stop_at_step", 0))
        if self.checkpoint_due(stopping):
          self.writer.flush()  # metrics.jsonl covers every step a resume from this checkpoint keeps.
          self.save()
        if self.step % self.plan.steps_per_epoch == 0:
          self.end_epoch(evaluate=not preempted)  # A preempted host has seconds left: only the save counts.
        if stopping:
          ended = "stopped"
          break
    finally:
      bar.close()
      self.close()
      self.stop.restore()
    self.summary.update(final_step=self.step, ended=ended, state=self.state, model_config=self.model_config)
    metrics_lib.log("%s at step %d of %d; checkpoints in %s", ended, self.step, self.plan.total_steps,
                    self.manager.directory)
    return self.summary

  def train_step(self) -> tuple[int, dict]:
    """One optimizer step on the next batch; returns (its epoch, its metrics on the host)."""
    epoch, local_batch = next(self.data.train)
    batch = data_lib.to_global_batch(local_batch, self.mesh, self.batch_spec)
    try:
      self.state, step_metrics = self.compiled_step(self.state, batch)
      step_metrics = jax.device_get(step_metrics)
    except jax.errors.JaxRuntimeError as e:
      if jax.process_count() > 1 and distributed.looks_like_lost_peer(e):
        distributed.peer_lost(str(e))
      raise
    self.step += 1
    return epoch, step_metrics

  def record(self, step_metrics) -> None:
    """The step's loss in the summary; every `train.log_every_steps` (and last) its metrics line."""
    now = time.perf_counter()
    step_time, self.last_time = now - self.last_time, now
    batch_size, max_len = int(self.config.train.batch_size), int(self.config.data.max_len)
    loss, tokens = float(step_metrics["loss"]), float(step_metrics["tokens"])
    self.summary["losses"].append(loss)
    self.epoch_tokens = [self.epoch_tokens[0] + tokens, self.epoch_tokens[1] + batch_size * max_len]
    if self.step % int(self.config.train.log_every_steps) and self.step != self.plan.total_steps:
      return
    # MFU and tokens/s count only real tokens (and attention within each real sequence); HFU
    # counts the padded program the chips run.
    flops = flops_lib.train_flops(self.model_config, batch_size, max_len, tokens=tokens,
                                  attended=float(step_metrics["attended"]))
    chips_peak = self.peak * self.mesh.size
    self.writer.write(self.step, {
        "loss": loss, "lr": step_metrics["lr"], "grad_norm": step_metrics["grad_norm"],
        "epoch": self.step / self.plan.steps_per_epoch, "step_time_s": step_time,
        "tokens_per_s": tokens / step_time, "padding_share": 1.0 - tokens / (batch_size * max_len),
        "mfu": flops["model"] / step_time / chips_peak if self.peak else 0.0,
        "hfu": flops["hardware"] / step_time / chips_peak if self.peak else 0.0})

  def checkpoint_due(self, stopping: bool) -> bool:
    """At an epoch's end, every `train.checkpoint_every_steps`, when stopping, and at the end."""
    every = int(self.config.train.checkpoint_every_steps)
    return (self.step % self.plan.steps_per_epoch == 0 or (every > 0 and self.step % every == 0)
            or stopping or self.step == self.plan.total_steps)

  def save(self) -> None:
    step = self.step
    meta = {"step": step, "epoch": step / self.plan.steps_per_epoch,
            "rng": np.asarray(jax.device_get(self.state.rng)).tolist(),
            "data": self.data.train.get_state(), "config": workdir_lib.json_config(self.config),
            "total_steps": self.plan.total_steps, "mesh": dict(self.mesh.shape)}
    # Orbax would wait for the previous save here anyway; once it is committed, the state
    # before it is no longer needed to resume.
    self.manager.wait_until_finished()
    self.prune()
    if ckpt_lib.save_training(self.manager, step, params=self.state.params, opt_state=self.state.opt_state,
                              model_config=self.model_config, tokenizer_blob=self.data.tokenizer.to_blob(),
                              train_state=meta):
      distributed.set_resume_hint(saved_step=step)
      metrics_lib.log("saving checkpoint %s", self.manager.directory / str(step))

  def prune(self) -> None:
    """Drops what no committed newer step needs: the optimizer state of older steps (by
    default), and the steps `train.keep_epochs` leaves out. Runs with no save in flight."""
    if self.plan.keep_opt == "latest":
      pruned = ckpt_lib.prune_optimizer_state(self.manager)
      if pruned:
        metrics_lib.info("deleted opt_state/ of steps %s (train.keep_optimizer_state=latest)", pruned)
    finished = ckpt_lib.finished_steps(self.manager)
    for step in superseded_steps(finished, self.plan.keep_epochs, self.plan.steps_per_epoch):
      self.manager.delete(step)  # Every process calls it (Orbax syncs them); process 0 deletes.
      metrics_lib.info("deleted checkpoint %d (not an epoch in train.keep_epochs)", step)

  def end_epoch(self, evaluate: bool) -> None:
    """The epoch's padding share; unless preempted, dev loss and dev generations."""
    step, done = self.step, self.step // self.plan.steps_per_epoch
    padding = 1.0 - self.epoch_tokens[0] / max(self.epoch_tokens[1], 1.0)
    self.writer.write(step, {"epoch_padding_share": padding})
    metrics_lib.log("epoch %d: %.1f%% of the batch positions were padding (MFU and tokens/s leave them out)",
                    done, 100 * padding)
    self.epoch_tokens = [0.0, 0.0]
    if not evaluate:
      return
    params = train_step.full_params(self.model_config, self.state)
    dev = evaluate_dev(self.eval_step, params, self.data, self.mesh, self.batch_spec)
    if dev:
      self.writer.write(step, dev, flush=True)
      metrics_lib.log("epoch %d: dev loss %.4f, perplexity %.2f", done, dev["dev_loss"], dev["dev_perplexity"])
    self.summary.update(dev)
    generations = generate_dev_responses(self.config, self.model_config, params, self.mesh, self.data)
    if generations and jax.process_index() == 0:
      records = [{"epoch": done, "step": step, **g} for g in generations]
      (self.workdir / "dev_generations").mkdir(parents=True, exist_ok=True)
      paths.write_text_atomic(self.workdir / "dev_generations" / f"epoch_{done}.jsonl",
                              "".join(json.dumps(r) + "\n" for r in records))
    self.summary["generations"] = generations
    self.last_time = time.perf_counter()  # Evaluation time is not step time.

  def close(self) -> None:
    """Waits for the last save, prunes, and closes the checkpoint manager and the metric writer."""
    self.manager.wait_until_finished()
    self.prune()
    self.manager.close()
    self.writer.close()


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
