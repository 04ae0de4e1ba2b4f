"""The off-policy scan loop (DQN): ``train_every`` env steps, then one update, repeated.

Time (the global env-step count) is the same for every seed, so the loop passes it in unbatched:
under vmap, everything that depends only on time -- epsilon, the replay write position, whether
learning has started, whether a target sync is due -- stays a scalar, and the branches on it are
real ``lax.cond``s rather than selects that compute both sides. An iteration is an inner scan
of ``train_every`` vectorised env steps, one contiguous replay write, and one update.

With ``agent.freeze`` the runner also keeps the frozen parameters as they started
(``FrozenRunner``) and each logging block reports ``frozen_param_drift``. ``check_inputs`` and
``prepare`` are the driver's hooks for ``agent.init_from`` (``rlstop.agents.freeze``).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from rlstop.agents import freeze, replay
from rlstop.agents.freeze import check_inputs, prepare  # noqa: F401 - the driver's hooks
from rlstop.agents.dqn import DQN, DQNState, sync_due
from rlstop.agents.replay import Transition
from rlstop.train.common import EpisodeStats, Program, greedy_returns, masked_mean

METRICS = ("loss", "grad_norm", "q_mean", "q_max_abs")


@flax.struct.dataclass
class Runner:
    agent: DQNState
    buffer: replay.ReplayState
    env_state: Any
    obs: jnp.ndarray
    stats: EpisodeStats
    key: jax.Array


FrozenRunner = freeze.runner_with_initial(Runner)


def make_program(cfg, env, varying: frozenset = frozenset()) -> Program:
    a, t = cfg.agent, cfg.train
    num_envs = cfg.env.num_envs
    if not env.discrete:
        from rlstop.errors import UserError

        raise UserError(f"DQN needs a discrete action space; {env.id} has continuous actions "
                        "(use agent.kind=ppo or a2c)")
    agent = DQN(a, env.obs_shape, env.num_actions, varying)
    steps_per_iter = a.train_every * num_envs
    iters_per_block = t.log_every // steps_per_iter
    total_steps = t.total_steps

    def init(key, hp) -> Runner:
        k_agent, k_env, k_run = jax.random.split(key, 3)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(k_env, num_envs))
        example = Transition(obs[0], jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros((), jnp.bool_), obs[0])
        state = agent.init(k_agent, hp)
        parts = (state, replay.init(example, a.buffer_size), env_state, obs, EpisodeStats.init(num_envs), k_run)
        if a.freeze:
            return FrozenRunner(*parts, freeze.select(state.params, a.freeze))
        return Runner(*parts)

    def iteration(runner: Runner, hp, it):
        steps_before = it * steps_per_iter
        # Every random number of the iteration in three calls (each call site costs compile time).
        key, k_env, k_act, k_sample = jax.random.split(runner.key, 4)
        env_keys = jax.random.split(k_env, (a.train_every, 2, num_envs))
        uniforms = jax.random.uniform(k_act, (a.train_every, num_envs))
        params = runner.agent.params

        def env_step(carry, xs):
            env_state, obs, stats = carry
            k, u, j = xs
            eps = agent.epsilon(steps_before + j * num_envs, hp, total_steps)
            action = agent.act_with_uniform(params, obs, u, eps)
            out = jax.vmap(env.step_with_keys)(k[0], k[1], env_state, action)
            stats = stats.update(out.reward, out.terminated | out.truncated)
            return (out.state, out.obs, stats), Transition(obs, action, out.reward, out.terminated, out.final_obs)

        (env_state, obs, stats), trans = jax.lax.scan(
            env_step, (runner.env_state, runner.obs, runner.stats), (env_keys, uniforms, jnp.arange(a.train_every)))
        trans = jax.tree.map(lambda x: x.reshape((steps_per_iter,) + x.shape[2:]), trans)
        buffer = replay.add(runner.buffer, trans, steps_before)
        steps_after = steps_before + steps_per_iter
        batch = replay.sample(buffer, k_sample, a.batch_size, steps_after)

        def learn(agent_state):
            sync = sync_due(steps_before, steps_after, hp["target_update_period"])
            return agent.update(agent_state, batch, hp, sync)

        def wait(agent_state):  # before learning_starts: no update, but the value estimates are real
            nan = jnp.full((), jnp.nan, jnp.float32)
            out = {"loss": nan, "grad_norm": nan, **agent.q_stats(agent_state.params, batch.obs)}
            # learn's dtypes (with train.x64 the env's float64 data makes some metrics float64).
            like = jax.eval_shape(learn, agent_state)[1]
            return agent_state, {k: v.astype(like[k].dtype) for k, v in out.items()}

        # CleanRL: updates start once more than learning_starts steps were taken.
        learning = steps_before >= a.learning_starts
        agent_state, metrics = jax.lax.cond(learning, learn, wait, runner.agent)
        return runner.replace(agent=agent_state, buffer=buffer, env_state=env_state, obs=obs, stats=stats,
                              key=key), (metrics, learning)

    def block(runner: Runner, hp, t_block):
        runner = runner.replace(stats=runner.stats.new_window())
        its = t_block * iters_per_block + jnp.arange(iters_per_block)
        runner, (metrics, learning) = jax.lax.scan(lambda r, it: iteration(r, hp, it), runner, its)
        # loss and grad_norm average the updates that were applied (NaN before learning starts);
        # the value estimates are real at every point, so they are reported throughout.
        out = {k: masked_mean(metrics[k], learning) for k in ("loss", "grad_norm")}
        out["q_mean"] = jnp.mean(metrics["q_mean"])
        out["q_max_abs"] = jnp.max(metrics["q_max_abs"])
        out["episode_return"] = runner.stats.window_mean()
        if a.freeze:
            out.update(freeze.drift(runner.agent.params, runner.frozen0, a.freeze))
        return runner, out

    def evaluate(params, key, hp):
        return greedy_returns(env, lambda obs: agent.greedy(params, obs), key, t.eval_episodes)

    return Program(init, block, evaluate, t.log_every, "q_max_abs", METRICS + freeze.metric_names(a.freeze),
                   timed=True)


def greedy_policy(cfg, env, runner):
    """obs [N, ...] -> greedy actions, for rendering one seed's policy outside the loop."""
    agent = DQN(cfg.agent, env.obs_shape, env.num_actions)
    params = runner.agent.params
    return lambda obs: agent.greedy(params, obs)
