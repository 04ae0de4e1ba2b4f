"""gymnax (>= 1.0) environments behind the interface the scan loops use.

gymnax 1.0 ``step`` returns ``(obs, state, reward, terminated, truncated, info)`` and resets
automatically; the observation it returns after an episode ends is the *next episode's* first
observation, and the true last observation is ``info["final_observation"]``. The adapter hands
both to the loops, which bootstrap from the true last observation on truncation and never
across an episode boundary.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlstop.errors import UserError

# Largest |reward| of one step: r_max in the soft-divergence bound r_max / (1 - gamma)
# (van Hasselt et al. 2018).
REWARD_BOUNDS = {
    "CartPole-v1": 1.0,
    "Acrobot-v1": 1.0,
    "MountainCar-v0": 1.0,
    "Pendulum-v1": 16.2736,  # pi^2 + 0.1 * 8^2 + 0.001 * 2^2
    "MountainCarContinuous-v0": 100.0,
}


class Step(NamedTuple):
    obs: jnp.ndarray          # observation to act on next (first obs of a new episode after a reset)
    state: Any
    reward: jnp.ndarray
    terminated: jnp.ndarray   # the episode reached a terminal state: do not bootstrap
    truncated: jnp.ndarray    # the time limit cut the episode: bootstrap from final_obs
    final_obs: jnp.ndarray    # the true next observation of this transition


class GymnaxEnv:
    """One gymnax environment with its parameters fixed. Pure functions; the caller vmaps."""

    backend = "gymnax"

    def __init__(self, env_id: str):
        import gymnax

        if env_id not in gymnax.registered_envs:
            raise UserError(
                f"unknown gymnax env id {env_id!r}; try one of {', '.join(sorted(REWARD_BOUNDS))} "
                "or set env.backend=gymnasium"
            )
        self.id = env_id
        self._env, self.params = gymnax.make(env_id)
        obs_space = self._env.observation_space(self.params)
        self.obs_shape = tuple(obs_space.shape)
        space = self._env.action_space(self.params)
        self.discrete = hasattr(space, "n")
        if self.discrete:
            self.num_actions = int(space.n)
        else:
            self.action_shape = tuple(space.shape)
            self.action_low = jnp.asarray(space.low, jnp.float32) * jnp.ones(space.shape)
            self.action_high = jnp.asarray(space.high, jnp.float32) * jnp.ones(space.shape)
        self.max_episode_steps = int(self.params.max_steps_in_episode)
        self.reward_bound = REWARD_BOUNDS.get(env_id, 1.0)

    def reset(self, key: jax.Array):
        obs, state = self._env.reset(key, self.params)
        return obs.astype(jnp.float32), state

    def step(self, key: jax.Array, state: Any, action: jnp.ndarray) -> Step:
        key_step, key_reset = jax.random.split(key)
        return self.step_with_keys(key_step, key_reset, state, action)

    def step_no_reset(self, key_step: jax.Array, state: Any, action: jnp.ndarray) -> Step:
        """One step without the reset where the episode ended (``obs`` and ``final_obs`` are both
        the step's own observation): for loops that stop counting at an episode's end, such as
        evaluation, and so need neither the reset nor its random numbers."""
        env, params = self._env, self.params
        obs, state, reward, terminated, _ = env.step_env(key_step, state, action, params)
        truncated = jnp.logical_and(env.is_truncated(state, params), jnp.logical_not(terminated))
        obs = obs.astype(jnp.float32)
        return Step(obs, state, jnp.asarray(reward, jnp.float32), terminated.astype(jnp.bool_),
                    truncated.astype(jnp.bool_), obs)

    def step_with_keys(self, key_step: jax.Array, key_reset: jax.Array, state: Any, action: jnp.ndarray) -> Step:
        """gymnax 1.0's ``step`` (step, then reset where the episode ended) with both keys given,
        so a loop can draw every key of an iteration in one call rather than one split per step."""
        return self.step_with_reset(key_step, self.reset(key_reset), state, action)

    def step_with_reset(self, key_step: jax.Array, reset: tuple, state: Any, action: jnp.ndarray) -> Step:
        """``step_with_keys`` with the reset already drawn: ``reset`` is the (obs, state) the
        episode starts over from if it ends at this step: ``reset(key_reset)``, e.g. drawn ahead
        for many steps at once (``draw_resets``)."""
        last = self.step_no_reset(key_step, state, action)
        done = jnp.logical_or(last.terminated, last.truncated)
        obs_re, state_re = reset
        state = jax.tree.map(lambda r, x: jax.lax.select(done, r, x), state_re, last.state)
        obs = jax.lax.select(done, obs_re, last.obs)
        return last._replace(obs=obs, state=state)

    def draw_resets(self, keys: jax.Array, batch_shape: tuple) -> tuple:
        """``reset`` for a batch of keys (``batch_shape``, e.g. a whole rollout [T, N]), in one
        call: the (obs, state) each env would start over from, drawn ahead for ``step_with_reset``.
        ``step_with_reset`` with ``reset(key_reset)`` is ``step_with_keys(key_step, key_reset)``,
        bit for bit.

        One random-number call on the whole batch instead of one per step: on CPU each call is a
        loop of its own (JAX's threefry), which in a rollout step costs more than the step. The
        draws take about as much memory as the rollout's observations.
        """
        flat = keys.reshape((-1,) + keys.shape[len(batch_shape):])
        resets = jax.vmap(self.reset)(flat)
        return jax.tree.map(lambda x: x.reshape(tuple(batch_shape) + x.shape[1:]), resets)
