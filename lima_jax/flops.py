"""Analytic cost of the programs: FLOPs of a train or decode step, and a rough HBM estimate.

MFU, tokens/s, the AOT report and the fit table all count FLOPs here rather than with XLA's
`cost_analysis()`, which counts a scanned layer stack's loop body once (docs/tpu.md). The HBM
estimate only picks defaults (micro-batching); the compiler's figure is the one to trust.
"""

from lima_jax import lora as lora_lib


def matmul_params(model_config) -> int:
  """Parameters that take part in matmuls: all but the input embedding and the norm scales.

  The output projection counts at its padded width, as it is computed (tied or not).
  """
  c = model_config
  attn = c.d_model * c.dim_per_head * (2 * c.n_heads + 2 * c.kv_heads)
  return c.n_layers * (attn + 3 * c.d_model * c.mlp_dim) + c.d_model * c.padded_vocab_size


def train_flops(model_config, batch_size: int, seq_len: int, *, tokens: float | None = None,
                attended: float | None = None) -> dict[str, float]:
  """Analytic FLOPs of one optimizer step over batch_size x seq_len tokens.

  model    = 6 * N * tokens + 12 * L * (H * Dh) * attended
             (N = matmul parameters, `matmul_params`; forward 2 N per token, backward 4 N; the
             attention scores and weighted values are 4 * (H * Dh) per query-key pair a layer
             forward, twice that backward; the causal mask is not exploited)
  hardware = the padded program (tokens = batch * seq, attended = batch * seq^2) + one more
             forward with full remat, which recomputes each layer in the backward pass.

  `tokens` (non-pad tokens) and `attended` (the sum over the batch's sequences of their length
  squared: each attends only within itself) make `model` count the real work, so MFU and
  tokens/s never credit padding; left out, both are the padded values. `hardware` is always
  what the chips execute.
  """
  c = model_config
  n = matmul_params(c)
  width = 4 * c.n_layers * c.n_heads * c.dim_per_head
  padded_tokens, padded_attended = batch_size * seq_len, batch_size * seq_len ** 2
  tokens = padded_tokens if tokens is None else tokens
  attended = padded_attended if attended is None else attended
  weight_flops = 6 * n  # A token's matmuls: forward 2 N, backward 4 N.
  if getattr(c, "lora", None) is not None:
    # LoRA: the frozen weights get no weight gradient (forward 2 N + input gradients 2 N a
    # token); the adapters train in full.
    weight_flops = 4 * n + 6 * lora_lib.num_trainable(c)
  model = weight_flops * tokens + 3 * width * attended
  padded = weight_flops * padded_tokens + 3 * width * padded_attended
  recompute = 2 * n * padded_tokens + width * padded_attended if c.remat_policy == "full" else 0
  return {"model": float(model), "hardware": float(padded + recompute),
          "matmul_params": float(n), "tokens": float(tokens)}


def decode_flops(model_config, batch_size: int, prompt_len: int, new_tokens: int,
                 cache_len: int) -> dict[str, float]:
  """Analytic FLOPs of prefill (prompt_len tokens a row) plus `new_tokens` single-token steps.

  2 * N a token for the matmuls; attention reads the whole cache each step (the program
  attends over all cache_len slots and masks), 4 * (H * Dh) * cache_len a token a layer.
  """
  c = model_config
  n = matmul_params(c)
  width = c.n_layers * c.n_heads * c.dim_per_head
  prefill = batch_size * (2 * n * prompt_len + 4 * width * prompt_len * cache_len)
  step = batch_size * (2 * n + 4 * width * cache_len)
  return {"prefill": float(prefill), "per_token_step": float(step),
          "total": float(prefill + new_tokens * step)}


# ---------------------------------------------------------------------------------------------
# Memory, to choose defaults.


def train_bytes_estimate(model_config, mesh: dict, batch_size: int, seq_len: int,
                         micro_batches: int = 1, fused_update: bool = False) -> int:
  """A rough per-device HBM estimate of one training step, only to choose defaults.

  fp32 parameters + two fp32 AdamW moments + fp32 gradients (none with the fused update of one
  micro-batch; an fp32 accumulator more when micro-batching), all split over fsdp x tensor;
  with full remat the bf16 layer inputs of every
  layer, plus one layer's working set and the float32 logits. The compiler's figure
  (tools/aot_compile.py) is the one to trust.
  """
  c = model_config
  shards = mesh["fsdp"] * mesh.get("tensor", 1) * mesh.get("sequence", 1)
  params = c.num_params() + (c.padded_vocab_size - c.vocab_size) * c.d_model * (
      1 if c.tie_embeddings else 2)
  per_param = 12 if fused_update and micro_batches == 1 else 16 + (4 if micro_batches > 1 else 0)
  state = params * per_param / shards
  if getattr(c, "lora", None) is not None:  # A frozen base, no moments; only adapters train.
    base = params * {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(c.param_dtype), 4)
    state = (base + lora_lib.num_trainable(c) * (16 + (4 if micro_batches > 1 else 0))) / shards
  rows = max(1, batch_size // (mesh["data"] * mesh["fsdp"] * micro_batches))
  tokens = rows * seq_len / mesh.get("sequence", 1)
  act = 2  # bf16
  layer_inputs = c.n_layers * tokens * c.d_model * act
  if c.remat_policy == "none":
    layer_inputs *= 6 + 3 * c.mlp_dim / c.d_model
  working = tokens * (8 * c.d_model + 4 * c.mlp_dim / mesh.get("tensor", 1)) * act
  logits = 3 * tokens * c.padded_vocab_size * 4 / mesh.get("tensor", 1)
  return int(state + layer_inputs + working + logits)


def default_micro_batches(model_config, mesh: dict, batch_size: int, seq_len: int,
                          hbm_bytes: int, fused_update: bool = False) -> int:
  """1 when the step fits; else the fewest halvings of each device's rows that make it fit.

  Micro-batching trades activation memory for an fp32 gradient accumulator, which at 65B costs
  more than it saves (measured: 78.8 -> 89.3 GiB on v5p-32), so it is only chosen when the
  estimate says one batch does not fit and the split one does.
  """
  rows = batch_size // (mesh["data"] * mesh["fsdp"])
  micro = 1
  while train_bytes_estimate(model_config, mesh, batch_size, seq_len, micro,
                             fused_update) > 0.9 * hbm_bytes:
    if rows % (micro * 2) or batch_size % (micro * 2):
      return 1
    micro *= 2
  return micro
