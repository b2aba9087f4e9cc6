"""`ModelConfig`: the shapes, numerics and family of one model, shared by every module that builds,
shards, converts or counts one (`model.ModelConfig` is the same class)."""

import dataclasses
from typing import Any, Mapping

import jax

from lima_jax import attention
from lima_jax import lora as lora_lib

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Named jax.checkpoint policies for `remat_policy` ("query_proj" etc. are checkpoint_name tags in model.py).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj", "mlp_out"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of one model; `configs/lima.py` `config.model` holds the same fields."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  mlp_dim: int
  n_kv_heads: int = 0  # 0 = n_heads.
  head_dim: int = 0  # 0 = d_model // n_heads.
  vocab_pad_multiple: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()  # Sorted (key, value) pairs; hashable.
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  residual_dropout: float = 0.0
  attention: str = "auto"
  # Which Hugging Face architecture this is; only export (config.json's class) depends on it.
  model_type: str = "llama"
  attention_bias: bool = False  # Biases on the q/k/v projections (Qwen2); o_proj has none.
  qk_norm: bool = False  # RMSNorm over head_dim on each head's q and k, before rotary (Qwen3).
  sliding_window: int = 0  # A key is visible only if q_pos - k_pos < window (Mistral); 0 = none.
  lora: lora_lib.LoraConfig | None = None  # Low-rank adapters on a frozen base (lima_jax.lora).

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
    if isinstance(self.lora, Mapping):
      object.__setattr__(self, "lora", lora_lib.LoraConfig.from_dict(self.lora))
    if self.n_heads % self.kv_heads:
      raise ValueError(f"model: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    if self.attention not in attention.ATTENTION_MODES:
      raise ValueError(f"model.attention={self.attention!r}; expected auto, xla or splash")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model.model_type={self.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    if self.sliding_window < 0:
      raise ValueError(f"model.sliding_window={self.sliding_window}; expected 0 (none) or a window size")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def padded_vocab_size(self) -> int:
    m = max(1, self.vocab_pad_multiple)
    return -(-self.vocab_size // m) * m

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
    """Builds from `config.model` (or JSON); fields that are not model shapes (init_from) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = dict(fields)
    if "rope_scaling" in fields and not isinstance(fields["rope_scaling"], tuple):
      fields["rope_scaling"] = dict(fields["rope_scaling"] or {})
    return cls(**{k: v for k, v in fields.items() if k in names})

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling)
    return d

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, include_embedding: bool = True) -> int:
    """Parameter count with the real (unpadded) vocabulary."""
    d, f, l = self.d_model, self.mlp_dim, self.n_layers
    attn = d * self.dim_per_head * (2 * self.n_heads + 2 * self.kv_heads)
    if self.attention_bias:
      attn += self.dim_per_head * (self.n_heads + 2 * self.kv_heads)
    if self.qk_norm:
      attn += 2 * self.dim_per_head
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    embed = d * self.vocab_size
    n = l * per_layer + d + head
    return n + embed if include_embedding or self.tie_embeddings else n
