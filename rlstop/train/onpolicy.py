"""The on-policy scan loop (A2C, PPO), in the manner of PureJaxRL's ``make_train``.

An iteration is a rollout of ``agent.num_steps`` vectorised steps of ``env.num_envs`` gymnax envs
(one ``lax.scan``), then the agent's update on it: ``num_epochs`` x ``num_minibatches`` gradient
steps (one scan over them, or a scan over epochs of scans over minibatches when the batch is large:
``ActorCriticAgent.update``). A logging block is ``train.log_every / (num_steps * num_envs)``
iterations. Nothing here branches per step: there is no ``lax.cond`` to turn into a select.

With ``agent.freeze`` the runner also keeps the frozen parameters as they started
(``FrozenRunner``) and each logging block reports ``frozen_param_drift``. ``check_inputs`` and
``prepare`` are the driver's hooks for ``agent.init_from`` (``rlstop.agents.freeze``).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from rlstop.agents import freeze
from rlstop.agents.actor_critic import ActorCriticAgent, ActorCriticState, Rollout
from rlstop.agents.freeze import check_inputs, prepare  # noqa: F401 - the driver's hooks
from rlstop.agents.scan import scan_packed, scan_stacked
from rlstop.errors import UserError
from rlstop.train.common import EpisodeStats, Program, greedy_returns

METRICS = ("loss", "actor_loss", "critic_loss", "entropy", "grad_norm", "value_mean", "value_max_abs")


@flax.struct.dataclass
class Runner:
    agent: ActorCriticState
    env_state: Any
    obs: jnp.ndarray
    stats: EpisodeStats
    key: jax.Array


FrozenRunner = freeze.runner_with_initial(Runner)


def make_program(cfg, env, varying: frozenset = frozenset(), batch: int = 1) -> Program:
    """``varying``: the traced values that differ across the vmapped batch (see the driver);
    ``batch``: the runs trained together, which bounds the memory the agent's update may spend
    (``ActorCriticAgent.update``)."""
    if getattr(env, "backend", None) != "gymnax":
        raise UserError(f"agent.kind={cfg.agent.kind} runs on gymnax envs; {cfg.env.id!r} is not one "
                        "(try CartPole-v1, Acrobot-v1 or Pendulum-v1)")
    a, t = cfg.agent, cfg.train
    num_envs = cfg.env.num_envs
    steps_per_iter = a.num_steps * num_envs
    if t.log_every % steps_per_iter:
        raise UserError(f"train.log_every={t.log_every} must be a multiple of agent.num_steps * env.num_envs "
                        f"= {a.num_steps} * {num_envs} = {steps_per_iter} (one rollout)")
    if num_envs % a.num_minibatches:
        raise UserError(f"env.num_envs={num_envs} must be a multiple of agent.num_minibatches={a.num_minibatches}")
    iters_per_block = t.log_every // steps_per_iter
    agent = ActorCriticAgent(a, env, num_envs, t.total_steps, varying, batch)

    def init(key, hp) -> Runner:
        k_agent, k_env, k_run = jax.random.split(key, 3)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(k_env, num_envs))
        state = agent.init(k_agent, hp)
        if a.freeze:
            return FrozenRunner(state, env_state, obs, EpisodeStats.init(num_envs), k_run,
                                freeze.select(state.params, a.freeze))
        return Runner(state, env_state, obs, EpisodeStats.init(num_envs), k_run)

    def env_step(runner: Runner, xs):
        key_step, reset, noise = xs
        action, env_action, logp = agent.act(runner.agent.params, runner.obs, noise)
        out = jax.vmap(env.step_with_reset)(key_step, reset, runner.env_state, env_action)
        step = Rollout(runner.obs, action, logp, out.reward, out.terminated, out.truncated, out.final_obs)
        stats = runner.stats.update(out.reward, out.terminated | out.truncated)
        return runner.replace(env_state=out.state, obs=out.obs, stats=stats), step

    def iteration(runner: Runner, hp):
        # Two random-number calls an iteration: the keys (the next iteration's, the envs' step and
        # reset keys for the whole rollout, and keys whose bits become the action noise and the
        # update's shuffles), and the envs' resets. Every call site is compiled code of its own,
        # and on CPU a loop, which inside the rollout's scan would run at every step.
        shape, steps = (a.num_steps, num_envs), a.num_steps * num_envs
        words = agent.rollout_noise_words(shape)
        keys = jax.random.split(runner.key, 1 + 2 * steps + -(-words // 2))
        env_keys = keys[1:1 + 2 * steps].reshape((2,) + shape + keys.shape[1:])
        resets = env.draw_resets(env_keys[1], shape)
        noise, shuffle = agent.rollout_noise(jax.random.key_data(keys[1 + 2 * steps:]).reshape(-1)[:words], shape)
        runner, rollout = scan_packed(env_step, runner, (env_keys[0], resets, noise))
        agent_state, metrics = agent.update(runner.agent, rollout, shuffle, hp)
        return runner.replace(agent=agent_state, key=keys[0]), metrics

    def block(runner: Runner, hp):
        runner = runner.replace(stats=runner.stats.new_window())
        runner, metrics = scan_stacked(lambda r, _: iteration(r, hp), runner, None, length=iters_per_block)
        out = {k: jnp.mean(v) for k, v in metrics.items() if k != "value_max_abs"}
        out["value_max_abs"] = jnp.max(metrics["value_max_abs"])
        out["episode_return"] = runner.stats.window_mean()
        if a.freeze:
            out.update(freeze.drift(runner.agent.params, runner.frozen0, a.freeze))
        return runner, out

    def evaluate(params, key, hp):
        return greedy_returns(env, lambda obs: agent.greedy(params, obs), key, t.eval_episodes)

    return Program(init, block, evaluate, t.log_every, "value_max_abs", METRICS + freeze.metric_names(a.freeze))
