"""A uniform replay buffer over a pytree of arrays, optax-style pure functions.

The loops know how many transitions have been added (the global step count), so the buffer holds
only the data: the write position and fill level are derived from that count. In the scan loop
the count is the same for every seed, so it stays unbatched under vmap and a write is one
in-place ``dynamic_update_slice`` rather than a scatter.
"""
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
    data: Transition  # each leaf [capacity, ...]


def capacity(state: ReplayState) -> int:
    return jax.tree.leaves(state.data)[0].shape[0]


def init(example: Transition, capacity: int) -> ReplayState:
    return ReplayState(jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example))


def add(state: ReplayState, batch: Transition, count) -> ReplayState:
    """Write a batch of n transitions (leading axis) after ``count`` earlier ones.

    When n divides the capacity, writes never wrap inside a batch and the write is one contiguous
    slice; otherwise it is a scatter at ``(count + i) mod capacity``.
    """
    cap = capacity(state)
    n = jax.tree.leaves(batch)[0].shape[0]
    if cap % n == 0:
        start = (jnp.asarray(count) % cap).astype(jnp.int32)
        data = jax.tree.map(lambda d, x: jax.lax.dynamic_update_slice_in_dim(d, x.astype(d.dtype), start, 0),
                            state.data, batch)
    else:
        idx = (count + jnp.arange(n)) % cap
        data = jax.tree.map(lambda d, x: d.at[idx].set(x.astype(d.dtype)), state.data, batch)
    return ReplayState(data)


def sample(state: ReplayState, key: jax.Array, batch_size: int, count) -> Transition:
    """Uniform sample (with replacement) from the min(count, capacity) filled slots."""
    size = jnp.clip(count, 1, capacity(state))
    idx = jax.random.randint(key, (batch_size,), 0, size)
    return jax.tree.map(lambda d: d[idx], state.data)
