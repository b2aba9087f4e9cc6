"""LIMA fine-tuning configs: `--config=configs/lima.py:PRESET` (or `--config=PRESET`) with PRESET
one of `PRESETS`: tiny (random init, seconds on a CPU), cpu (a small pretrained model on a CPU
host), 7b, 13b, 33b, 65b (LLaMA-1), llama3-8b, mistral-7b, qwen2.5-7b. Every command's --help
names them from `PRESETS`; `lima-train --print_config` prints every field.

Every default follows the LIMA paper (Zhou et al., 2023, section 3 and appendix): AdamW
(0.9, 0.95), weight decay 0.1, lr 1e-5 -> 1e-6 linear with no warmup, 15 epochs, 32 conversations
a batch for 65B and 64 below, 2048 tokens, residual dropout 0.0 -> 0.3 (65B) / 0.2 (others), and
nucleus 0.9 / temperature 0.7 / repetition penalty 1.2 decoding. Any field can be overridden on
the command line, e.g. `--config.optimizer.lr=2e-5`.
"""

import ml_collections

# LLaMA-1 shapes (Touvron et al., 2023, table 2); 32000 SentencePiece pieces + EOT.
_LLAMA_SHAPES = {
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, mlp_dim=11008),
    "13b": dict(d_model=5120, n_layers=40, n_heads=40, mlp_dim=13824),
    "33b": dict(d_model=6656, n_layers=60, n_heads=52, mlp_dim=17920),
    "65b": dict(d_model=8192, n_layers=80, n_heads=64, mlp_dim=22016),
}

# The families people fine-tune today, with the shapes of their Hugging Face config.json. The
# vocabulary is the tokenizer's plus EOT where the model has no spare row for it (Qwen2.5's
# 152064 rows already exceed its 151665 tokens). `init_from` replaces all of these with the
# checkpoint's own; the preset sizes random-init runs and the TPU table.
_FAMILY_SHAPES = {
    # Llama-3.1-8B: GQA 32/8, theta 500000 with the "llama3" scaling, untied, 128256 tokens.
    "llama3-8b": dict(model_type="llama", vocab_size=128257, d_model=4096, n_layers=32, n_heads=32,
                      n_kv_heads=8, mlp_dim=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192),
                      max_seq_len=131072),
    # Mistral-7B-v0.3: v0.1's shape with 32768 tokens, theta 1e6 and no sliding window (v0.1 had
    # a 4096 window: its config.json sets sliding_window, which init_from reads).
    "mistral-7b": dict(model_type="mistral", vocab_size=32769, d_model=4096, n_layers=32, n_heads=32,
                       n_kv_heads=8, mlp_dim=14336, rms_norm_eps=1e-5, rope_theta=1e6,
                       max_seq_len=32768),
    # Qwen2.5-7B: q/k/v biases, GQA 28/4, theta 1e6, untied (the small sizes tie).
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, mlp_dim=18944, rms_norm_eps=1e-6, rope_theta=1e6,
                       attention_bias=True, max_seq_len=131072),
}
# `cpu` fine-tunes a small pretrained model (135M-360M in full, ~1B with LoRA) on one host: its
# shape comes from model.init_from's config.json, the model fields below only size a random init.
PRESETS = ("tiny", "cpu", *_LLAMA_SHAPES, *_FAMILY_SHAPES)
_CPU_PRESETS = ("tiny", "cpu")


def model_config(preset: str) -> ml_collections.ConfigDict:
  """The `model` section: the fields of `lima_jax.model.ModelConfig` plus where weights come from."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 32001  # 32000 LLaMA pieces + EOT; replaced by the tokenizer's size at run time.
  m.vocab_pad_multiple = 128  # Padded rows are never sampled nor counted in the loss.
  m.d_model = 64
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 0  # 0 means n_heads (multi-head attention, as LLaMA-1).
  m.head_dim = 0  # 0 means d_model // n_heads.
  m.mlp_dim = 176
  m.rms_norm_eps = 1e-6
  m.rope_theta = 10000.0
  m.rope_scaling = ml_collections.FrozenConfigDict({})  # LLaMA-3 style: factor, low/high_freq_factor, ...
  m.tie_embeddings = False
  m.max_seq_len = 2048
  m.param_dtype = "float32"
  m.dtype = "bfloat16"  # Compute dtype; the tiny preset uses float32 on CPU.
  m.scan_layers = True
  m.remat_policy = "full"  # none | full | save_dots | save_dots_no_batch | save_qkv_proj | save_out_proj
  m.residual_dropout = 0.2  # Rate of the top layer; layer i of L uses rate * i / (L - 1).
  m.attention = "auto"  # auto | xla | splash (the Pallas TPU kernel; auto picks it on TPU).
  m.model_type = "llama"  # llama | mistral | qwen2 | qwen3: the Hugging Face class on export.
  m.attention_bias = False  # q/k/v projection biases (Qwen2).
  m.qk_norm = False  # RMSNorm of each head's q and k before rotary (Qwen3).
  m.sliding_window = 0  # Keys fewer than this many positions back only (Mistral v0.1); 0 = none.
  m.init_from = ""  # A Hugging Face directory or a lima_jax Orbax checkpoint; "" = random init.
  if preset not in _CPU_PRESETS:
    shape = dict({**_LLAMA_SHAPES, **_FAMILY_SHAPES}[preset])
    scaling = shape.pop("rope_scaling", None)
    m.update(shape)
    if scaling:
      m.rope_scaling = ml_collections.FrozenConfigDict(scaling)
    m.residual_dropout = 0.3 if preset == "65b" else 0.2
  elif preset == "tiny":
    m.dtype = "float32"
    m.max_seq_len = 512
    m.remat_policy = "none"
  else:  # cpu: XLA:CPU computes float32 faster than bfloat16; remat keeps 4 rows of 1024 in RAM.
    m.dtype = "float32"
  return m


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  # Here, not at the top: every command's --help reads PRESETS from this file and must not wait
  # for jax, which lima_jax.sampling imports.
  from lima_jax import sampling  # pylint: disable=g-import-not-at-top
  preset = (preset or "tiny").strip().lower()  # `:7B` is `:7b`.
  if preset not in PRESETS:
    raise ValueError(f"configs/lima.py: unknown preset {preset!r}; expected one of "
                     f"{', '.join(PRESETS)} (e.g. --config=7b or --config=configs/lima.py:7b)")
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.model = model_config(preset)

  config.data = ml_collections.ConfigDict()
  config.data.train_path = ""  # JSONL file(s) or glob; "" = the bundled sample (tiny preset).
  config.data.dev_path = ""
  config.data.test_path = ""
  config.data.tfds_name = ""  # e.g. "lima"; used instead of the paths when set.
  config.data.tfds_data_dir = ""
  config.data.tfds_manual_dir = ""  # train/dev/test.jsonl; "" = <tfds_data_dir>/downloads/manual.
  config.data.tokenizer_path = ""  # tokenizer.model, tokenizer.json or a model directory.
  config.data.eot_token = "<EOT>"
  config.data.max_len = 2048
  config.data.packing = False
  config.data.train_on_prompt = False
  config.data.skip_bad_lines = False
  config.data.shuffle_seed = 0
  config.data.sources = ""  # Ablations: keep the training conversations of these sources ("stackexchange,wikihow").
  config.data.max_examples = 0  # Ablations: a seeded subset of this many training conversations (0 = all).
  config.data.subset_seed = 0
  config.data.worker_count = 0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 1e-5
  config.optimizer.end_lr = 1e-6
  config.optimizer.warmup_steps = 0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 0.0  # 0 = off; the paper names no clipping.

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 15
  config.train.batch_size = 32 if preset == "65b" else 64  # Conversations per optimizer step.
  config.train.micro_batches = 1  # Gradient accumulation steps per optimizer step.
  # Apply each layer's AdamW update in the backward pass (no whole-model gradient in memory)
  # where the step allows it: one micro-batch, no clipping, full fine-tuning. False: never.
  config.train.fused_update = True
  config.train.seed = 0
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 0  # 0 = only at epoch ends.
  config.train.keep_checkpoints = 0  # 0 = keep every epoch (the paper picks one of epochs 5-10).
  # "latest": only the newest checkpoint keeps the AdamW moments (2x the parameters' bytes), older
  # ones keep their parameters; "all": every checkpoint keeps them (resume from any step).
  config.train.keep_optimizer_state = "latest"
  # Epochs whose checkpoints stay, e.g. "5-10" (the paper's choice) or "5,8,10"; "" = every one.
  # The others are saved too (to resume from) and deleted once a newer checkpoint is committed.
  config.train.keep_epochs = ""
  config.train.dev_generations = 4  # Dev prompts answered at each epoch end.
  config.train.dev_max_new_tokens = 256
  config.train.peak_flops_per_device = 0.0  # 0 = from the chip table, or measured on CPU.
  config.train.max_steps = 0  # 0 = epochs * steps_per_epoch; for quick trials only.
  config.train.stop_at_step = 0  # Save and exit after this step; the lr schedule still spans the run.
  config.train.distributed = False  # jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set).
  # Before the first step, refuse a step whose compiled memory exceeds the device's (host RAM on
  # CPU); False skips that (e.g. a host whose swap you mean to use). See lima_jax/memory_fit.py.
  config.train.check_memory = True

  # LoRA (lima_jax/lora.py): rank 0 = full fine-tuning. Otherwise the base is frozen in
  # base_dtype and only the adapters (float32) and the EOT rows train; scaling alpha / rank as
  # PEFT's. LoRA usually wants a larger lr than LIMA's 1e-5 (torchtune's recipes use 3e-4).
  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 0
  config.lora.alpha = 16.0  # torchtune's choice for rank 8 (scale 2); PEFT's default is 8.
  config.lora.dropout = 0.0  # On each adapter's input, as PEFT's lora_dropout.
  config.lora.targets = "all"  # "all" or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
  config.lora.base_dtype = "bfloat16"  # The frozen base weights' dtype.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.fsdp = -1  # -1 takes the devices the other axes leave.
  config.mesh.sequence = 1
  config.mesh.tensor = 1

  # LIMA's decoding, from its one home: nucleus 0.9, temperature 0.7, repetition penalty 1.2 on
  # generated tokens, 2048 tokens (each field is explained in lima_jax/sampling.py).
  config.sampling = ml_collections.ConfigDict(sampling.SamplingConfig().to_dict())

  # lima-serve / lima-evaluate's engine (lima_jax/serve, docs/serving.md): decode slots sharing
  # one KV cache of up to sampling.max_len tokens each (never shorter than min_cache_len), decode
  # steps per engine call, waiting requests before 503, most top_logprobs, seconds SIGTERM waits
  # for answers in flight.
  config.serve = ml_collections.ConfigDict(dict(
      slots=8, steps_per_call=4, min_cache_len=128, max_queue=256, top_logprobs=20,
      shutdown_timeout=30.0))

  if preset == "tiny":
    config.data.max_len = 512
    config.train.epochs = 15
    config.train.batch_size = 8
    config.optimizer.lr = 1e-3
    config.optimizer.end_lr = 1e-4
    config.train.dev_max_new_tokens = 32
    config.sampling.max_len = 512
    config.sampling.max_new_tokens = 64
  elif preset == "cpu":
    # The paper's optimizer, lr 1e-5 -> 1e-6 and 15 epochs; 16 conversations a step in 4
    # micro-batches of 4 rows of 1024 tokens, which a 135M-360M model trains in under 16 GB.
    config.data.max_len = 1024
    config.train.batch_size = 16
    config.train.micro_batches = 4
    config.train.dev_max_new_tokens = 128
  return config
