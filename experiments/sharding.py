"""Device mesh with named axes and logical-axis rules for parameters and batches.

The mesh has axes ('data', 'fsdp', 'tensor'): batches are split over data x fsdp,
parameters are split over fsdp (ZeRO-3 style, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models") and over tensor for the head / MLP / vocab
dimensions (Megatron-style, "Megatron-LM", Shoeybi et al. 2019). Each parameter names
its dimensions with logical axes (`logical_axes` metadata on the NNX variable); RULES
map logical names to mesh axes. A dimension that a mesh axis does not divide, or whose
mesh axis is already used by another dimension, is replicated instead.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('classes', None),
    ('head_dim', None),
    ('norm', None),
    ('patch', None),
    ('seq', None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes; one -1 is replaced by what the others leave."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown or set(sizes) != set(MESH_AXES):
    raise ValueError(
        f'mesh must give exactly the axes {MESH_AXES}, got {sorted(sizes)}.')
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(
        f'mesh sizes must be positive ints with at most one -1, got {sizes}.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f'mesh {sizes}: {num_devices} devices are not divisible by {known}.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) > num_devices:
    raise ValueError(
        f'mesh {sizes} needs {math.prod(shape)} devices, only {num_devices} '
        'are available.')
  return tuple(shape)


def make_mesh(sizes: dict[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over the first prod(shape) devices (topology-aware when possible)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(sizes), len(devices))
  used = devices[:math.prod(shape)]
  try:
    grid = mesh_utils.create_device_mesh(shape, used)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(used, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> P:
  """PartitionSpec of an array of `shape` whose dimensions have these names."""
  if len(logical_axes) != len(shape):
    raise ValueError(
        f'logical_axes {tuple(logical_axes)} must name every dimension of '
        f'shape {tuple(shape)}.')
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in table:
      raise ValueError(
          f'logical axis {name!r} has no rule; known: {sorted(table)}.')
    target = None if name is None else table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an NNX State of variables with `logical_axes` metadata.

  Returns a pure-dict tree (as `nnx.to_pure_dict`) of NamedSharding.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def one(variable):
    meta = variable.get_metadata()
    axes = meta.get('logical_axes')
    shape = variable.get_value().shape
    if axes is None:
      raise ValueError(
          f'parameter of shape {shape} has no logical_axes metadata.')
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

  return nnx.to_pure_dict(jax.tree.map(
      one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-host batches into global arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
