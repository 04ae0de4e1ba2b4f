"""Pieces every scan loop shares: episode statistics, greedy evaluation, the program interface."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Program(NamedTuple):
    """What a loop hands the driver. All functions are pure, for ONE seed/variant (the driver vmaps).

    init(key, hp) -> runner                   the agent, env and buffers before any step
    block(runner, hp) -> (runner, metrics)    advance ``steps_per_block`` env steps; metrics are scalars
                                              (with ``timed``: block(runner, hp, t), t the block index,
                                              the same for the whole batch and so unbatched under vmap)
    evaluate(params, key, hp) -> scalar       mean greedy return over eval episodes of the agent with
                                              ``runner.agent.params`` (None: no evaluation)
    """

    init: Callable
    block: Callable
    evaluate: Callable | None
    steps_per_block: int
    value_metric: str           # the value magnitude the divergence check reads
    metric_names: tuple          # names of the scalars ``block`` returns (besides episode_return)
    timed: bool = False          # block(runner, hp, t) also takes the global block index t, unbatched


def masked_mean(x, mask):
    """Mean of x over entries where mask is true; NaN when none is (nothing to report)."""
    mask = mask.astype(jnp.float32)
    n = jnp.sum(mask)
    return jnp.where(n > 0, jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(n, 1.0), jnp.nan)


def greedy_returns(env, policy: Callable, key: jax.Array, num_episodes: int) -> jnp.ndarray:
    """Undiscounted return of ``num_episodes`` episodes run in parallel, each until its first end.

    ``policy(obs[N, ...]) -> actions[N]`` must be deterministic. Episodes run for at most the
    env's time limit, which the env itself enforces through truncation.
    """
    k_reset, k_steps = jax.random.split(key)
    obs, state = jax.vmap(env.reset)(jax.random.split(k_reset, num_episodes))
    # Every step key at once. An episode is not reset where it ends (its return stops counting
    # there), so the second half of each step's keys, the reset's in the training loops, is unused.
    keys = jax.random.split(k_steps, (env.max_episode_steps, 2, num_episodes))

    def step(carry, k):
        obs, state, ret, alive = carry
        action = policy(obs)
        out = jax.vmap(env.step_no_reset)(k[0], state, action)
        ret = ret + jnp.where(alive, out.reward, 0.0)
        alive = alive & ~(out.terminated | out.truncated)
        return (out.obs, out.state, ret, alive), None

    init = (obs, state, jnp.zeros(num_episodes), jnp.ones(num_episodes, jnp.bool_))
    (_, _, ret, _), _ = jax.lax.scan(step, init, keys)
    return jnp.mean(ret)


class EpisodeStats(NamedTuple):
    """Running return per env, and the returns of the episodes that ended in the logging window."""

    ret: jnp.ndarray       # [num_envs] return of the episode in progress
    done_sum: jnp.ndarray  # sum of returns of episodes that ended in this window
    done_n: jnp.ndarray    # number of such episodes

    @staticmethod
    def init(num_envs: int) -> "EpisodeStats":
        return EpisodeStats(jnp.zeros(num_envs), jnp.zeros(()), jnp.zeros(()))

    def update(self, reward, done) -> "EpisodeStats":
        ret = self.ret + reward
        return EpisodeStats(
            jnp.where(done, 0.0, ret),
            self.done_sum + jnp.sum(jnp.where(done, ret, 0.0)),
            self.done_n + jnp.sum(done),
        )

    def window_mean(self):
        return jnp.where(self.done_n > 0, self.done_sum / jnp.maximum(self.done_n, 1.0), jnp.nan)

    def new_window(self) -> "EpisodeStats":
        return EpisodeStats(self.ret, jnp.zeros(()), jnp.zeros(()))


def tree_where(cond, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)
