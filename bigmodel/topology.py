"""Cloud TPU slices by name, their devices without a TPU attached, and the chip tables.

A slice is named the way users book it: `v5e-16`, `v6e-64` count chips; `v4-32`, `v5p-128`
count TensorCores, two per chip (Google's naming for the megacore generations), so `v5p-128`
is 64 chips. `topology_devices` asks libtpu (the `tpu` extra) for that slice's devices through
`jax.experimental.topologies.get_topology_desc`; jax then compiles for them with the real TPU
compiler, on a CPU host, without changing the process's default backend (CPU stays CPU).

Chip figures come from Google's Cloud TPU system-architecture pages
(https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), as of 2025: HBM per chip and the
dense bf16 peak per chip.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

from bigmodel.config import ConfigError

GiB = 2 ** 30

INSTALL_HINT = ("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
                "(or pip install 'libtpu==0.0.42.*', the version jax 0.10.2's tpu extra names)")


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str          # the name before the dash: v4, v5e, v5p, v6e
  libtpu_name: str         # get_topology_desc's name for it
  hbm_bytes: int           # per chip
  bf16_peak_flops: float   # dense, per chip
  counts_cores: bool       # the slice suffix counts TensorCores (2 per chip), not chips
  dims: int                # torus dimensions (2D for v5e/v6e, 3D for v4/v5p)
  chip_config: str         # libtpu's chip configuration: megacore on v4 and v5p (one JAX device
                           # per chip, its two TensorCores as one), default on v5e and v6e
  source: str


CHIPS = {c.generation: c for c in (
    Chip("v4", "v4", 32 * GiB, 275e12, True, 3, "megacore", "https://cloud.google.com/tpu/docs/v4"),
    Chip("v5e", "v5e", 16 * GiB, 197e12, False, 2, "default", "https://cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "v5p", 95 * GiB, 459e12, True, 3, "megacore", "https://cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", "v6e", 32 * GiB, 918e12, False, 2, "default", "https://cloud.google.com/tpu/docs/v6e"),
)}

# Chips -> the slice's physical shape (the shapes Cloud TPU offers; larger 3D slices grow by 4x4x4 cubes).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str          # as given, e.g. v5p-128
  chip: Chip
  chips: int
  shape: tuple[int, ...]

  @property
  def libtpu_topology(self) -> str:
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Which axes of the slice close into a ring (wraparound ICI links): on v4 and v5p every
    axis once the slice is whole 4x4x4 cubes (64 chips and up); on v5e and v6e an axis of 16
    chips. Smaller slices are open meshes. The collectives the compiler picks depend on it (an
    open 64-chip mesh gathers weights by all-reduce). As Cloud TPU's topology pages and
    MaxText's accelerator_to_spec_map give them."""
    if self.chip.dims == 3:
      cube = all(d % 4 == 0 for d in self.shape)
      return (cube, cube, cube)
    return (self.shape[0] == 16, self.shape[1] == 16, False)


def valid_names() -> list[str]:
  names = []
  for chip in CHIPS.values():
    per_chip = 2 if chip.counts_cores else 1
    for chips in (SHAPES_3D if chip.dims == 3 else SHAPES_2D):
      names.append(f"{chip.generation}-{chips * per_chip}")
  return names


def parse(name: str) -> Topology:
  """`v5p-128` -> Topology(64 chips, 4x4x4). Unknown names list the valid ones."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  chip = CHIPS.get(m.group(1)) if m else None
  if chip is not None:
    count = int(m.group(2))
    chips = count // 2 if chip.counts_cores else count
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if (not chip.counts_cores or count % 2 == 0) and chips in shapes:
      return Topology(name, chip, chips, shapes[chips])
  raise ConfigError(f"--topology {name!r} is not a known TPU slice; valid names: "
                    f"{', '.join(valid_names())} (v4 and v5p count TensorCores, 2 per chip: "
                    f"v5p-128 is 64 chips; v5e and v6e count chips)")


@functools.lru_cache(maxsize=None)
def _devices(libtpu_topology: str, chip_config: str, wrap: tuple[bool, bool, bool]) -> tuple:
  try:
    import libtpu  # noqa: F401  (the TPU compiler jax loads for a topology)
  except ImportError:
    raise ConfigError(INSTALL_HINT) from None
  from jax.experimental import topologies
  # libtpu looks for the TPU VM's host list; on a CPU host there is none (a harmless warning).
  # Compiling touches no chip: let several processes load libtpu (else a lockfile in /tmp
  # admits one at a time). Both only while libtpu loads: TPU_WORKER_HOSTNAMES left in the
  # environment would make this process (and its children) look like a TPU pod worker to
  # bigmodel.distributed.
  saved = {k: os.environ.get(k) for k in ("TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_topology,
                                        chip_config_name=chip_config,
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1,
                                        wrap=wrap)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return tuple(desc.devices)


def topology_devices(topo: Topology) -> list:
  """The slice's TPU devices (one per chip), for compiling only; jax's default backend is unchanged."""
  devices = list(_devices(topo.libtpu_topology, topo.chip.chip_config, topo.wrap))
  if len(devices) != topo.chips:
    raise RuntimeError(f"libtpu gave {len(devices)} devices for {topo.libtpu_topology}, "
                       f"expected {topo.chips} (one per chip)")
  return devices


def make_mesh(mesh_cfg, devices):
  """The (data, fsdp, tensor) mesh over a slice's devices, in jax's topology-aware order.
  A mesh that does not multiply to the chip count names both."""
  import jax
  from jax.sharding import AxisType

  from bigmodel import sharding
  sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
  if -1 not in sizes and sizes[0] * sizes[1] * sizes[2] != len(devices):
    raise ConfigError(f"mesh data={sizes[0]},fsdp={sizes[1]},tensor={sizes[2]} has "
                      f"{sizes[0] * sizes[1] * sizes[2]} devices but the topology has "
                      f"{len(devices)} chips; make the product {len(devices)} or set one axis to -1")
  shape = sharding.resolve_mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
