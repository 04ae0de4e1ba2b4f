"""The run batch across devices and hosts, with JAX's own runtime (jax.sharding, jax.distributed).

The batch axis (runs x seeds) is embarrassingly parallel: each element is one independent
training run. It is laid out over a one-axis ``Mesh`` of the devices (every device of every
process when launched under ``jax.distributed``; in one process, at most one device per element
of the batch), padded to a multiple of the device count; the compiled function then runs each
device's slice with no communication. Values shared by the whole batch stay replicated. On CPU,
``rlstop.train.runtime`` makes one device per core.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_initialized = False


def maybe_initialize() -> None:
    """``jax.distributed.initialize()`` when launched as one of several processes.

    Recognised launches: SLURM with more than one task (``srun``), or the coordinator given in the
    environment: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``. CPU processes exchange data through gloo.
    """
    global _initialized
    if _initialized:
        return
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    if not (slurm or explicit):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
    else:
        jax.distributed.initialize()  # reads SLURM's variables
    _initialized = True


def is_main_process() -> bool:
    return jax.process_index() == 0


def batch_mesh(batch: int) -> Mesh | None:
    """The mesh for a batch of ``batch`` runs, or None for one device. In one process, devices
    beyond the batch size would only train padding, so a batch of one stays unsplit (and
    bit-identical to a run on a one-device machine)."""
    devices = jax.devices()
    if jax.process_count() == 1:
        devices = devices[:batch]
    return Mesh(np.asarray(devices), ("batch",)) if len(devices) > 1 else None


def padded_size(batch: int, mesh: Mesh | None) -> int:
    if mesh is None:
        return batch
    n = mesh.devices.size
    return -(-batch // n) * n


def pad(keys, hp: dict, hp_axes: dict, size: int):
    """Repeat the last element of every batched input up to ``size`` (the extra rows are dropped
    from the results)."""
    extra = size - keys.shape[0]
    if extra <= 0:
        return keys, hp

    def grow(x):
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])

    return grow(keys), {k: grow(v) if hp_axes[k] == 0 else v for k, v in hp.items()}


def shardings(mesh: Mesh):
    """(split over the batch axis, replicated)."""
    return NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())


def hp_shardings(mesh: Mesh, hp_axes: dict) -> dict:
    """Per hyper-parameter: split where it varies across the batch (axis 0), else replicated."""
    split, whole = shardings(mesh)
    return {k: split if a == 0 else whole for k, a in hp_axes.items()}


def place(keys, hp: dict, hp_axes: dict, mesh: Mesh | None):
    """Batched inputs split over the mesh, shared ones replicated (global arrays on every process)."""
    if mesh is None:
        return keys, hp

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    hp_s = hp_shardings(mesh, hp_axes)
    return put(keys, shardings(mesh)[0]), {k: put(v, hp_s[k]) for k, v in hp.items()}


def fetch(tree):
    """Host numpy copies of (possibly multi-process) global arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
