"""Device meshes, multi-host start-up and sharding helpers.

One data-parallel axis (``'data'``) carries the examples of a batch; parameters, optimizer
state and PRNG keys are replicated. The same code runs on 1 CPU, 8 emulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), a GPU, and a multi-host TPU pod slice
or SLURM GPU job. Everything uses the ``jax.sharding`` API (``Mesh`` + ``NamedSharding`` with
``jax.jit``); nothing here uses ``pmap``.

[design] Multi-host convention: a *global* batch of ``B`` examples is split in process order;
process ``p`` of ``P`` loads the rows ``[p*B/P, (p+1)*B/P)`` (:func:`process_slice`) and
:func:`host_local_to_global` assembles the global array. On one process this is the same as
:func:`shard_batch`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, axis: str = DATA_AXIS,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``num_devices`` devices (default: all global devices) named ``axis``.

    ``devices`` overrides the device list (e.g. ``jax.local_devices()``). The first
    ``num_devices`` devices in ``jax.devices()`` order (process-major) are used.
    """
    devs = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(devs)
    if not 1 <= num_devices <= len(devs):
        raise ValueError(f"make_mesh: num_devices={num_devices} but {len(devs)} devices "
                         f"are available ({devs[0].platform})")
    return Mesh(np.asarray(devs[:num_devices]), (axis,))


def data_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
    """Sharding of an array whose leading (batch) axis is split over ``axis``."""
    return NamedSharding(mesh, P(axis))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    return mesh.shape[axis]


def _check_divisible(tree: Any, n: int, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path)} is a scalar; every "
                             f"batch leaf needs a leading batch axis")
        if shape[0] % n:
            raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path)} has batch size "
                             f"{shape[0]}, not divisible by the {n} devices of the "
                             f"data axis; choose a batch size that is a multiple of {n}")


def shard_batch(batch: Any, mesh: Mesh, axis: str = DATA_AXIS) -> Any:
    """Places a *global* batch (pytree of arrays ``[B, ...]``) sharded on its leading axis.

    Single-process only (on several processes every process would need the whole batch);
    use :func:`host_local_to_global` there. Raises ``ValueError`` naming the leaf when ``B``
    is not divisible by the size of ``axis``.
    """
    if jax.process_count() > 1:
        return host_local_to_global(
            jax.tree.map(lambda x: np.asarray(x)[process_slice(np.shape(x)[0])], batch),
            mesh, axis)
    _check_divisible(batch, _axis_size(mesh, axis), "shard_batch")
    return jax.device_put(batch, data_sharding(mesh, axis))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies every leaf of ``tree`` onto every device of ``mesh`` (replicated sharding).

    On several processes each process must pass the same values (e.g. parameters built from
    the same seed or read from the same checkpoint).
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() > 1:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
    return jax.device_put(tree, sharding)


def process_slice(global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """Rows of a global batch this process loads: ``[p*B/P, (p+1)*B/P)``."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{n} processes")
    per = global_batch_size // n
    return slice(p * per, (p + 1) * per)


def host_local_to_global(local_batch: Any, mesh: Mesh, axis: str = DATA_AXIS) -> Any:
    """Assembles per-process batch slices ``[B/P, ...]`` into global arrays ``[B, ...]``.

    Wraps ``jax.make_array_from_process_local_data`` with the data sharding of ``mesh``; each
    process passes its own rows (see :func:`process_slice`). Raises ``ValueError`` when the
    global batch is not divisible by the size of ``axis``.
    """
    n_proc = jax.process_count()
    n_dev = _axis_size(mesh, axis)
    sharding = data_sharding(mesh, axis)

    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * n_proc,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    _check_divisible(jax.tree.map(lambda x: np.empty((np.shape(x)[0] * n_proc,)), local_batch),
                     n_dev, "host_local_to_global")
    return jax.tree.map(one, local_batch)


def on_process0_first(open_fn, what: str):
    """``open_fn()`` on process 0, a barrier, then on the other processes; returns its result
    on every process. For files one process must create before the others read them (e.g. a
    store's ``meta.json``). One process: just ``open_fn()``."""
    if jax.process_count() == 1:
        return open_fn()
    from jax.experimental import multihost_utils
    out = open_fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"created {what}")
    return open_fn() if out is None else out


def my_share(todo: Sequence[int]) -> list[int]:
    """This process's items of ``todo`` as process 0 sees it (broadcast), dealt round-robin:
    process ``p`` of ``P`` takes ``todo[p::P]`` (e.g. a store's missing chunks). ``todo``
    holds distinct non-negative ints. One process: all of ``todo``."""
    todo = [int(i) for i in todo]
    if jax.process_count() == 1:
        return todo
    from jax.experimental import multihost_utils
    n = int(multihost_utils.broadcast_one_to_all(np.int64(max(todo, default=-1) + 1)))
    mask = np.zeros(n, np.int32)
    if jax.process_index() == 0:
        mask[todo] = 1
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return [int(i) for i in np.nonzero(mask)[0]][jax.process_index()::jax.process_count()]


def global_to_host_local(tree: Any) -> Any:
    """Fetches global arrays to numpy on every process (all-gathers sharded leaves)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


# Environment variables that mark a multi-process launch which jax.distributed can detect on
# its own (SLURM, Open MPI, TPU pod slices, or an explicit JAX coordinator).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _env_num_processes() -> int | None:
    for name in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            try:
                return int(os.environ[name])
            except ValueError:
                pass
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len([h for h in hosts.split(",") if h])
    return None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs) -> bool:
    """Starts ``jax.distributed`` for a multi-process run; a no-op for a single process.

    With all arguments ``None`` the launch is detected from the environment: SLURM
    (``SLURM_NTASKS`` > 1 inside a job), Open MPI, TPU pod slices (``TPU_WORKER_HOSTNAMES``
    with several hosts) or ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``;
    ``jax.distributed.initialize`` then reads the details itself. Must be called before any
    other JAX call. Returns True when ``jax.distributed`` was initialized.
    """
    if coordinator is None:
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_num_processes()
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes is not None and num_processes <= 1:
        return False
    explicit = coordinator is not None
    detected = explicit or any(os.environ.get(v) for v in _CLUSTER_ENV) or (
        "SLURM_JOB_ID" in os.environ and (num_processes or 0) > 1)
    if not detected:
        return False
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id,
                                   **kwargs)
    else:  # let JAX's cluster detection fill in coordinator / ids
        jax.distributed.initialize(**kwargs)
    return True
