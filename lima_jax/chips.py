"""One table of TPU chips and Cloud TPU slice names: the facts behind every TPU figure.

The AOT compile tool (`tools/aot_compile.py`), the README's fit table and the training log's
MFU all read the chip facts below, so a corrected number changes them together. Stdlib only at
import time, which is why the commands can import it before jax.

Usable HBM is what libtpu's compiler itself allows a program ("exceeds available HBM (X)" in
its RESOURCE_EXHAUSTED message), measured with libtpu 0.0.42.1 by compiling an oversized program
for each chip; it is a little under the marketed capacity. Peak bf16 FLOP/s, chips per host and
TensorCores per chip and HBM bandwidth are from the Cloud TPU system-architecture pages.

Slice names follow Cloud TPU: `v4-N` and `v5p-N` count TensorCores (two per chip, fused into one
"megacore" JAX device), `v5e-N` / `v5litepod-N` and `v6e-N` count chips (one core each). So
v5p-32 is 16 chips (16 JAX devices) laid out 2x2x4, and v5e-256 is 256 chips laid out 16x16.
"""


import dataclasses
import math
import re

GiB = 1024 ** 3
# Model FLOPs utilisation assumed for the step time a compile report implies.
DEFAULT_MFU = 0.4


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation. A JAX device is one chip (megacore chips fuse their two cores)."""
  name: str  # Cloud TPU prefix: v4, v5p, v5e, v6e.
  hbm_bytes: int  # Usable per chip, as the compiler counts it.
  bf16_flops: float  # Peak dense bf16 FLOP/s per chip.
  chips_per_host: int  # In multi-host slices.
  cores_per_chip: int  # TensorCores; 2 = megacore (one JAX device per chip).
  topology_prefix: str  # libtpu's name: "v5:2x2x4", "v5e:16x16", ...
  torus_dims: int  # 3 (v4, v5p: 3D torus of chips) or 2 (v5e, v6e).
  device_kinds: tuple[str, ...]  # jax `Device.device_kind` strings of this chip.
  hbm_bandwidth: float  # Bytes/s per chip.

  @property
  def counts_cores(self) -> bool:
    """True where the Cloud TPU name (v4-8, v5p-8) counts TensorCores, not chips."""
    return self.cores_per_chip > 1

  @property
  def chip_config_name(self) -> str:
    return "megacore" if self.cores_per_chip > 1 else "default"


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", int(30.75 * GiB), 275e12, 4, 2, "v4", 3, ("TPU v4",), 1228e9),
    "v5p": Chip("v5p", int(95.74 * GiB), 459e12, 4, 2, "v5", 3, ("TPU v5p", "TPU v5"), 2765e9),
    "v5e": Chip("v5e", int(15.75 * GiB), 197e12, 4, 1, "v5e", 2, ("TPU v5 lite", "TPU v5e"), 819e9),
    "v6e": Chip("v6e", int(31.25 * GiB), 918e12, 4, 1, "v6e", 2, ("TPU v6 lite", "TPU v6e"), 1640e9),
}

_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice (or `num_slices` identical slices joined over the data-center network)."""
  name: str  # As given, e.g. "v5p-128".
  chip: Chip
  shape: tuple[int, ...]  # Chips along each torus axis, e.g. (4, 4, 4).
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_devices(self) -> int:
    """JAX devices in all slices together (one per chip)."""
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """The block of chips one host drives: 2x2x1 in multi-host slices; a single host holds all."""
    if self.chips_per_slice <= self.chip.chips_per_host or (
        self.chip.torus_dims == 2 and self.chips_per_slice <= 8):
      # Single-host slices (v5e-8 and v6e-8 are one 8-chip host).
      dims = list(self.shape) + [1] * (3 - len(self.shape))
      return tuple(dims)
    return (2, 2, 1)

  @property
  def num_hosts(self) -> int:
    return self.num_slices * max(1, self.chips_per_slice // math.prod(self.chips_per_host_bounds))

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Wraparound links: v4/v5p only in full 4x4x4 cubes and larger; v5e/v6e on 16-chip axes."""
    if self.chip.torus_dims == 3:
      cube = all(d >= 4 and d % 4 == 0 for d in self.shape)
      return (cube, cube, cube)
    dims = tuple(d == 16 for d in self.shape)
    return dims + (False,)

  def usable_hbm_bytes(self) -> int:
    return self.chip.hbm_bytes


def _power_of_two_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's slice shape for a power-of-two chip count: grow the last of the smallest axes."""
  shape = [2, 2, 1] if dims == 3 else [2, 2]
  if chips < math.prod(shape):
    if dims == 2 and chips in (1, 2):
      return (1, chips)
    raise ValueError(f"no {dims}D TPU slice of {chips} chips")
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, d in enumerate(shape) if d == smallest)
    shape[last] *= 2
  return tuple(shape)


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """`v5p-128` / `v4-64` / `v5e-256` / `v5litepod-16` / `v6e-64` (or `v5p:4x4x4`) -> Slice."""
  text = name.strip().lower()
  explicit = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", text)
  counted = re.fullmatch(r"(v\w+?)-(\d+)", text)
  if not (explicit or counted):
    raise ValueError(f"--topology={name!r}: expected a Cloud TPU name such as v5p-128, v4-64, "
                     f"v5e-256 (v5litepod-256) or v6e-64, or a shape such as v5p:4x4x4")
  match = explicit or counted
  generation = _ALIASES.get(match.group(1), match.group(1))
  if generation not in CHIPS:
    raise ValueError(f"--topology={name!r}: unknown TPU generation {match.group(1)!r}; "
                     f"known: {', '.join(CHIPS)} (v5litepod = v5e)")
  chip = CHIPS[generation]
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: must be at least 1")
  if explicit:
    shape = tuple(int(d) for d in match.group(2).split("x"))
    if len(shape) != chip.torus_dims:
      raise ValueError(f"--topology={name!r}: {generation} slices have {chip.torus_dims} axes")
    return Slice(name, chip, shape, num_slices)
  count = int(match.group(2))
  chips, rest = divmod(count, chip.cores_per_chip)
  if rest or chips < 1 or chips & (chips - 1):
    unit = "TensorCores (2 per chip)" if chip.counts_cores else "chips"
    raise ValueError(f"--topology={name!r}: {generation}-N counts {unit}; N must give a power-of-two "
                     f"number of chips (e.g. {generation}-{8 if chip.counts_cores else 16}); for "
                     f"other shapes name it directly, e.g. {chip.topology_prefix}:4x4x12")
  return Slice(name, chip, _power_of_two_shape(chips, chip.torus_dims), num_slices)


def chip_for_device_kind(device_kind: str) -> Chip | None:
  kind = device_kind.strip().lower()
  for chip in CHIPS.values():
    if any(kind == k.lower() for k in chip.device_kinds):
      return chip
  return None
