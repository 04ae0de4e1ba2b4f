"""The off-policy scan loop (DQN): ``train_every`` env steps, then one update, repeated.

The loop has no per-step ``lax.cond``: under vmap it would become a select that runs both
branches. An iteration is an inner scan of ``train_every`` vectorised env steps followed by one
update; updates before ``learning_starts`` are computed and discarded by one select per
iteration (a small, fixed cost: learning_starts / total_steps of the updates).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from rlstop.agents import replay
from rlstop.agents.dqn import DQN, DQNState
from rlstop.agents.replay import Transition
from rlstop.train.common import EpisodeStats, Program, greedy_returns, masked_mean, tree_where

METRICS = ("loss", "grad_norm", "q_mean", "q_max_abs")


@flax.struct.dataclass
class Runner:
    agent: DQNState
    buffer: replay.ReplayState
    env_state: Any
    obs: jnp.ndarray
    stats: EpisodeStats
    key: jax.Array


def make_program(cfg, env) -> Program:
    a, t = cfg.agent, cfg.train
    num_envs = cfg.env.num_envs
    agent = DQN(a, env.obs_shape, env.num_actions)
    steps_per_iter = a.train_every * num_envs
    iters_per_block = t.log_every // steps_per_iter
    total_steps = t.total_steps

    def init(key, hp) -> Runner:
        k_agent, k_env, k_run = jax.random.split(key, 3)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(k_env, num_envs))
        example = Transition(obs[0], jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros((), jnp.bool_), obs[0])
        return Runner(agent.init(k_agent, hp), replay.init(example, a.buffer_size), env_state, obs,
                      EpisodeStats.init(num_envs), k_run)

    def env_step(runner: Runner, hp):
        key, k_act, k_env = jax.random.split(runner.key, 3)
        eps = agent.epsilon(runner.agent.steps, hp, total_steps)
        action = agent.act(runner.agent.params, runner.obs, k_act, eps)
        out = jax.vmap(env.step)(jax.random.split(k_env, num_envs), runner.env_state, action)
        buffer = replay.add(runner.buffer, Transition(runner.obs, action, out.reward, out.terminated, out.final_obs))
        stats = runner.stats.update(out.reward, out.terminated | out.truncated)
        agent_state = runner.agent.replace(steps=runner.agent.steps + num_envs)
        return runner.replace(agent=agent_state, buffer=buffer, env_state=out.state, obs=out.obs,
                              stats=stats, key=key)

    def iteration(runner: Runner, hp):
        steps_before = runner.agent.steps
        runner, _ = jax.lax.scan(lambda r, _: (env_step(r, hp), None), runner, None, length=a.train_every)
        key, k_sample = jax.random.split(runner.key)
        batch = replay.sample(runner.buffer, k_sample, a.batch_size)
        new_agent, metrics = agent.update(runner.agent, batch, hp, steps_before)
        learning = runner.agent.steps >= a.learning_starts + steps_per_iter
        agent_state = tree_where(learning, new_agent, runner.agent)
        return runner.replace(agent=agent_state, key=key), (metrics, learning)

    def block(runner: Runner, hp):
        runner = runner.replace(stats=runner.stats.new_window())
        runner, (metrics, learning) = jax.lax.scan(lambda r, _: iteration(r, hp), runner, None,
                                                   length=iters_per_block)
        # loss and grad_norm average the updates that were applied (NaN before learning starts);
        # the value estimates are real at every point, so they are reported throughout.
        out = {k: masked_mean(metrics[k], learning) for k in ("loss", "grad_norm")}
        out["q_mean"] = jnp.mean(metrics["q_mean"])
        out["q_max_abs"] = jnp.max(metrics["q_max_abs"])
        out["episode_return"] = runner.stats.window_mean()
        return runner, out

    def evaluate(runner: Runner, key, hp):
        params = runner.agent.params
        policy = lambda obs: jnp.argmax(agent.network.apply(params, obs), axis=-1)  # noqa: E731
        return greedy_returns(env, policy, key, t.eval_episodes)

    return Program(init, block, evaluate, t.log_every, "q_max_abs", METRICS)
