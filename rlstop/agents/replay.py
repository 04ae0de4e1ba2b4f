"""A uniform replay buffer as an optax-style (init, add, sample) triple over a pytree of arrays."""
from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp


class Transition(NamedTuple):
    obs: jnp.ndarray         # s_{t-1}
    action: jnp.ndarray      # a_{t-1}
    reward: jnp.ndarray      # r_t
    terminated: jnp.ndarray  # s_t is terminal: no bootstrap
    next_obs: jnp.ndarray    # s_t, the true next observation (also on truncation)


@flax.struct.dataclass
class ReplayState:
    data: Transition   # each leaf [capacity, ...]
    ptr: jnp.ndarray   # next slot to write
    size: jnp.ndarray  # number of valid slots


def init(example: Transition, capacity: int) -> ReplayState:
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example)
    return ReplayState(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def add(state: ReplayState, batch: Transition) -> ReplayState:
    """Add a batch of transitions (leading axis = number of envs)."""
    capacity = jax.tree.leaves(state.data)[0].shape[0]
    n = jax.tree.leaves(batch)[0].shape[0]
    idx = (state.ptr + jnp.arange(n)) % capacity
    data = jax.tree.map(lambda d, x: d.at[idx].set(x), state.data, batch)
    return ReplayState(data, (state.ptr + n) % capacity, jnp.minimum(state.size + n, capacity))


def sample(state: ReplayState, key: jax.Array, batch_size: int) -> Transition:
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.size, 1))
    return jax.tree.map(lambda d: d[idx], state.data)
