"""Device mesh and logical-axis sharding rules, in the MaxText manner.

Arrays are annotated with *logical* axis names ("batch", "embed", "mlp", ...); a table of rules
maps each name to mesh axes. Changing how a model is split over a slice is a config change (the
mesh sizes, or the rules), never a model change.
"""

import contextlib
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical axis -> mesh axes. A logical axis whose mesh axes are already used by an earlier
# dimension of the same array is left replicated there (see `logical_to_spec`).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ("sequence",)),
    ("cache_length", ()),
    ("embed", ("fsdp", "sequence")),  # Parameters split over every axis that splits the batch.
    ("activation_embed", ("tensor",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
    ("lora_rank", ()),  # LoRA adapters: the small rank dimension is never split.
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of MESH_AXES from the config's `mesh` section; one axis may be -1 (fill the rest)."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices do not divide by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))} (product {known})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh: axes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices "
                     f"but {num_devices} are available; set one axis to -1 to fill")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              num_slices: int | None = None) -> Mesh:
  """The one mesh builder (training, evaluation, chat, AOT compiles): `devices` (default all)
  shaped by the config and laid out for the interconnect. Across several TPU slices
  (`num_slices`, default: counted from the devices) the data axis is the one that spans them,
  over the data-center network."""
  devices = list(jax.devices() if devices is None else devices)
  num_slices = num_slices or len({getattr(d, "slice_index", 0) for d in devices})
  shape = mesh_shape(mesh_config, len(devices))
  if num_slices > 1:
    if shape[0] % num_slices:
      raise ValueError(f"config.mesh.data={shape[0]} must be a multiple of the {num_slices} slices: "
                       f"the data axis is the one that crosses slices")
    ici = (shape[0] // num_slices,) + tuple(shape[1:])
    dcn = (num_slices,) + (1,) * (len(shape) - 1)
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(np.asarray(device_array), MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(
        shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


# The `mesh` section a preset leaves to the slice: see `mesh_for`.
DEFAULT_MESH = {"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1}
# Decoding reads every weight once a token; over fsdp each step would all-gather them all, so a
# TPU decodes over tensor (the heads split across one host's chips, up to 8) unless the mesh is set.
MAX_DECODE_TENSOR = 8


def decode_mesh_config(mesh_config: Mapping[str, int] | None, platform: str, num_devices: int) -> dict:
  """The mesh `lima-serve`, `lima-evaluate` and `lima-aot --program=decode` decode on: the
  config's, except that on TPU the preset's default (fsdp over every chip) becomes tensor over
  gcd(chips, 8) chips, fsdp over the rest."""
  given = {axis: int((mesh_config or {}).get(axis, DEFAULT_MESH[axis])) for axis in MESH_AXES}
  if platform != "tpu" or given != DEFAULT_MESH:
    return given
  return {"data": 1, "fsdp": -1, "sequence": 1, "tensor": math.gcd(num_devices, MAX_DECODE_TENSOR)}


def default_mesh(num_devices: int, batch_size: int, seq_len: int, num_slices: int = 1) -> dict:
  """Mesh axis sizes for `num_devices` that keep every device busy on a `batch_size` batch.

  Fully sharded data parallelism over as many devices as there are rows (each device holds
  1/fsdp of the state and computes its own rows); one replica per slice across the data-center
  network (`data` = num_slices); where a slice has more devices than rows, the rest split each
  row's tokens (`sequence`) when the length allows 128-token pieces, else the heads (`tensor`).
  Plain FSDP would instead leave the batch unsplit there, every device repeating the whole
  batch's activations (MaxText refuses such a mesh outright).
  """
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
  per_slice = num_devices // num_slices
  rows = batch_size // num_slices if batch_size % num_slices == 0 else batch_size
  fsdp = math.gcd(per_slice, max(rows, 1))
  rest = per_slice // fsdp
  mesh = {"data": num_slices, "fsdp": fsdp, "sequence": 1, "tensor": 1}
  if rest > 1:
    mesh["sequence" if seq_len % (rest * 128) == 0 else "tensor"] = rest
  return mesh


def mesh_for(mesh_config, num_devices: int, batch_size: int, seq_len: int,
             num_slices: int = 1) -> dict:
  """The mesh to use: `mesh_config` as given, unless it is the untouched default, then `default_mesh`.

  Training and the AOT compiler both call this, so the mesh compiled is the mesh trained.
  """
  given = {axis: int(mesh_config.get(axis, 1)) for axis in DEFAULT_MESH}
  if given != DEFAULT_MESH:
    return given
  return default_mesh(num_devices, batch_size, seq_len, num_slices)


def training_mesh(config, devices: Sequence[jax.Device] | None = None, num_slices: int | None = None) -> Mesh:
  """A run's mesh: `config.mesh` as given, or (left at its default) the one `mesh_for` picks for
  the batch, which is also the mesh `tools/aot_compile.py` compiles."""
  devices = list(jax.devices() if devices is None else devices)
  num_slices = num_slices or len({getattr(d, "slice_index", 0) for d in devices})
  sizes = mesh_for(config.mesh, len(devices), int(config.train.batch_size), int(config.data.max_len),
                   num_slices)
  return make_mesh(sizes, devices, num_slices)


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES,
                    mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions carry `logical_axes`.

  A mesh axis is used at most once per array, and (given `mesh` and `shape`) only where it
  divides the dimension, so odd sizes stay correct, merely replicated on that axis.
  """
  if logical_axes is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    chosen = []
    size = None if shape is None else shape[dim]
    for axis in table.get(name, ()) if name else ():
      if axis in used:
        continue
      axis_size = mesh.shape[axis] if mesh is not None else 1
      if mesh is not None and axis_size == 1:
        continue
      if size is not None and mesh is not None:
        if size % (math.prod(mesh.shape[a] for a in chosen) * axis_size):
          continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree, from a same-structured tree of logical-axis tuples."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)),
      logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, tuple))


_ACTIVE: list[tuple[Mesh, tuple]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
  """Within this context, `constrain` pins activations to the mesh; outside it is a no-op."""
  _ACTIVE.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.pop()


def active_mesh() -> tuple[Mesh, tuple] | None:
  """The (mesh, rules) set by the innermost `activation_sharding`, or None outside any."""
  return _ACTIVE[-1] if _ACTIVE else None


def target_platform() -> str:
  """The platform the code being traced will run on: the active mesh's devices ("tpu" while
  `tools/aot_compile.py` lowers for a TPU topology from a CPU host), else JAX's default backend."""
  active = active_mesh()
  if active is not None:
    return active[0].devices.flat[0].platform
  return jax.default_backend()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, so the model never names mesh axes itself."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
