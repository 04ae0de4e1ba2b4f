"""The finite-MDP loop for linear TD prediction (``agent.kind: td``).

A block is ``train.log_every`` env steps. ``agent.update: sampled``: every update draws one
transition from each of ``env.num_envs`` independent behaviour-policy chains and averages the
loss over them, so a block holds ``log_every / num_envs`` updates (env steps count transitions,
as in every loop). ``agent.update: expected``: an env step is one expected (DP) update and
nothing is sampled. Chains follow :func:`rlstop.envs.mdp.step`: after entering a terminal state a
chain continues from a fresh start state (``continue_state``), while the update bootstraps from
the true next state with discount 0.

Metrics per block (at the block's end unless said): ``loss`` (mean TD loss over the block's
updates, before l2), ``w_norm``, ``rmsve`` (sqrt of the mu-weighted squared error of the
values against the target policy's true v_pi, both computed exactly on the host once),
``value_max_abs`` (max over the block's updates and states of |v(s)|; the divergence check reads
it), and ``value_s<i>`` per state and ``w<i>`` per weight.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlstop.agents.td import TD, TDState
from rlstop.envs import mdp as mdp_lib
from rlstop.train.common import Program


@flax.struct.dataclass
class Runner:
    agent: TDState
    state: jax.Array   # [num_envs] int32, where each chain goes on from
    key: jax.Array


def metric_names(env) -> tuple:
    return (("loss", "w_norm", "rmsve", "value_max_abs")
            + tuple(f"value_s{i}" for i in range(env.num_states))
            + tuple(f"w{i}" for i in range(env.num_features)))


def make_program(cfg, env: mdp_lib.FiniteMDP) -> Program:
    a, t = cfg.agent, cfg.train
    agent = TD(a, env)
    sampled = a.update == "sampled"
    num_envs = cfg.env.num_envs if sampled else 1
    updates_per_block = t.log_every // num_envs
    # Host-side ground truth, closed over as constants.
    f = agent.features.dtype
    mu = jnp.asarray(mdp_lib.behavior_state_distribution(env), f)
    v_pi = jnp.asarray(mdp_lib.true_values(env), f)
    mdp_j = jax.tree.map(jnp.asarray, env)  # the sampler's arrays, in the default dtypes

    def init(key, hp) -> Runner:
        k_env, k_run = jax.random.split(key)
        s = jax.vmap(mdp_lib.reset, in_axes=(None, 0))(mdp_j, jax.random.split(k_env, num_envs))
        return Runner(agent.init(), s, k_run)

    def one_update(runner: Runner, hp):
        if sampled:  # static
            key, k_step = jax.random.split(runner.key)
            batch = jax.vmap(mdp_lib.step, in_axes=(None, 0, 0))(mdp_j, jax.random.split(k_step, num_envs),
                                                                 runner.state)
            agent_state, m = agent.update(runner.agent, batch, hp)
            return runner.replace(agent=agent_state, state=batch.continue_state, key=key), m
        agent_state, m = agent.update(runner.agent, None, hp)
        return runner.replace(agent=agent_state), m

    def block(runner: Runner, hp):
        runner, m = jax.lax.scan(lambda r, _: one_update(r, hp), runner, None, length=updates_per_block)
        w = runner.agent.w
        v = agent.values(w)
        out = {
            "loss": jnp.mean(m["loss"]),
            "w_norm": jnp.linalg.norm(w),
            "rmsve": jnp.sqrt(jnp.sum(mu * (v - v_pi) ** 2)),
            "value_max_abs": jnp.max(m["value_max_abs"]),
        }
        out.update({f"value_s{i}": v[i] for i in range(env.num_states)})
        out.update({f"w{i}": w[i] for i in range(env.num_features)})
        return runner, out

    return Program(init, block, None, t.log_every, "value_max_abs", metric_names(env))


def final_extras(runner: Runner, env: mdp_lib.FiniteMDP) -> dict:
    """summary.json ``final.weights`` [batch, d] and ``final.values`` [batch, S] (0 on terminal states)."""
    w = np.asarray(jax.device_get(runner.agent.w))
    v = w @ np.asarray(env.features, w.dtype).T
    v[:, np.asarray(env.terminal, bool)] = 0.0
    return {"weights": w, "values": v}
