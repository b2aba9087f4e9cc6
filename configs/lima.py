"""LIMA fine-tuning configs: `--config=configs/lima.py:PRESET` with PRESET in tiny, 7b, 13b, 33b, 65b.

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
  m.init_from = ""  # A Hugging Face directory or a lima_jax Orbax checkpoint; "" = random init.
  if preset != "tiny":
    m.update(_LLAMA_SHAPES[preset])
    m.residual_dropout = 0.3 if preset == "65b" else 0.2
  else:
    m.dtype = "float32"
    m.max_seq_len = 512
    m.remat_policy = "none"
  return m


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  preset = preset or "tiny"
  if preset not in ("tiny", *_LLAMA_SHAPES):
    raise ValueError(f"configs/lima.py: unknown preset {preset!r}; expected one of tiny, "
                     f"{', '.join(_LLAMA_SHAPES)} (e.g. --config=configs/lima.py:7b)")
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
  config.train.seed = 0
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 0  # 0 = only at epoch ends.
  config.train.keep_checkpoints = 0  # 0 = keep every epoch (the paper picks one of epochs 5-10).
  config.train.dev_generations = 4  # Dev prompts answered at each epoch end.
  config.train.dev_max_new_tokens = 256
  config.train.peak_flops_per_device = 0.0  # 0 = from the chip table, or measured on CPU.
  config.train.max_steps = 0  # 0 = epochs * steps_per_epoch; for quick trials only.
  config.train.stop_at_step = 0  # Save and exit after this step; the lr schedule still spans the run.
  config.train.distributed = False  # jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set).

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

  config.sampling = ml_collections.ConfigDict()
  config.sampling.top_p = 0.9
  config.sampling.temperature = 0.7
  config.sampling.repetition_penalty = 1.2
  config.sampling.max_len = 2048  # Prompt + response tokens.
  config.sampling.max_new_tokens = 2048
  config.sampling.greedy = False  # Argmax (after the repetition penalty) instead of sampling.
  config.sampling.seed = 0
  config.sampling.penalty_scope = "generated"  # "generated" (the paper) or "all" (+ prompt, as HF).
  config.sampling.max_prompt_len = 0  # Longer prompts lose their oldest turns; 0 = automatic.
  config.sampling.batch_size = 8

  if preset == "tiny":
    config.data.max_len = 512
    config.train.epochs = 15
    config.train.batch_size = 8
    config.optimizer.lr = 1e-3
    config.optimizer.end_lr = 1e-4
    config.train.dev_max_new_tokens = 32
    config.sampling.max_len = 512
    config.sampling.max_new_tokens = 64
  return config
