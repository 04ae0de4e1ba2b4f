"""The host loop: gymnasium vector envs stepped in Python, the agents' own jitted functions for the rest.

Where the env is not JAX-native it cannot live inside ``lax.scan``; everything else still can.
The loop steps a ``gymnasium_env.SameStepVectorEnv`` (``env.num_envs`` sub-envs, autoreset in the
same step, as gymnasium's SyncVectorEnv with SAME_STEP) and calls the same agent functions as the
scan loops, each compiled ahead of time once per group (``jax.jit(...).lower(...).compile()``: a
compiled call skips jit's dispatch checks, which on a small CPU cost as much as an env step):

* DQN (``DQNLoop``): epsilon-greedy as ``DQN.act`` computes it, split in two: the exploring half
  (``DQN.explore``: which envs explore and their random actions) of a whole logging block comes
  from one call, and the network (``DQN.greedy``) is called once per vector step only where some
  env does not explore (most steps early in training skip it). Every ``train_every`` vector
  steps the host hands the transitions over in one batch, and one call writes them to replay
  (``replay.add``), samples (``replay.sample``) and updates (``DQN.update``, target sync by
  ``sync_due``), as the off-policy scan loop's iteration does.
* A2C / PPO (``ActorCriticLoop``): one ``ActorCriticAgent.act`` call per vector step with the
  block's action noise drawn at once; one ``ActorCriticAgent.update`` call per rollout.

Termination and truncation stay apart: a transition stores the true next observation
(``info["final_obs"]`` where an episode ended) and ``terminated`` alone cuts the bootstrap, so a
time-limit truncation bootstraps from its real last state and nothing crosses an episode boundary.

Runs of a group and seeds of a run train one after another, each with its own vector env seeded
``seed * num_envs + i`` for sub-env i and its key ``PRNGKey(seed)``, so a run is reproducible;
all of them share the compiled functions (values that differ between runs are traced arguments).
The result is the scan loop's ``GroupResult``: the same metric columns, ``eval_return`` from
``train.eval_episodes`` greedy episodes every evaluation period, the same divergence check.
Not here (yet): checkpoints and resume, and ``rlstop eval`` of a finished run.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlstop.agents import replay
from rlstop.agents.replay import Transition
from rlstop.envs import gymnasium_env as genv
from rlstop.errors import UserError
from rlstop.train import runtime


def run_group(cfgs: list, progress: Callable | None = None):
    """Train every config in ``cfgs`` (one static signature) on the host loop -> ``GroupResult``."""
    from rlstop.train.driver import GroupResult, run_table, value_bound

    cfg0 = cfgs[0]
    if cfg0.train.x64:
        jax.config.update("jax_enable_x64", True)
    env = genv.GymnasiumEnv(cfg0.env.id)
    loops = {"dqn": DQNLoop, "a2c": ActorCriticLoop, "ppo": ActorCriticLoop}
    if cfg0.agent.kind not in loops:
        raise UserError(f"agent.kind={cfg0.agent.kind!r} has no gymnasium loop (it runs on finite MDPs: "
                        "env.backend=mdp); use dqn, a2c or ppo with gymnasium envs")
    if getattr(cfg0.agent, "init_from", None):
        raise UserError("agent.init_from is not supported by the gymnasium host loop yet; "
                        "start from scratch (agent.init_from=null) or use a gymnax env")
    t0 = time.perf_counter()
    hits0 = runtime.counts()["hits"]
    loop = loops[cfg0.agent.kind](cfg0, env)
    compile_s = time.perf_counter() - t0
    cache_hits = runtime.counts()["hits"] - hits0

    t = cfg0.train
    eval_every = t.eval_every or t.log_every
    blocks_per_eval = max(1, eval_every // t.log_every)
    n_blocks = (t.total_steps // eval_every) * blocks_per_eval
    pairs = [(c, c.train.seed + j) for c in cfgs for j in range(c.train.seeds)]
    total = n_blocks * t.log_every

    per_pair = []
    t_run = time.perf_counter()
    with frozen_heap():
        for k, (c, seed) in enumerate(pairs):
            def report(done, k=k):
                if progress is not None:
                    progress((k * total + done) // len(pairs), total)

            per_pair.append(loop.run(c, seed, n_blocks, blocks_per_eval, report)[0])
    run_s = time.perf_counter() - t_run

    steps = (np.arange(n_blocks) + 1) * t.log_every
    out, div_steps, nonfin, bounds = [], [], [], []
    k = 0
    for c in cfgs:
        rows = per_pair[k:k + c.train.seeds]
        k += c.train.seeds
        names = sorted(rows[0])  # the scan loop's order: its metrics come back as a sorted pytree
        m = {n: np.stack([r[n] for r in rows]) for n in names}  # [seeds, points]
        bounds.append(value_bound(c, env))
        df, first, nf = run_table(c, m, steps, loop.value_metric, bounds[-1])
        out.append(df)
        div_steps.append(first)
        nonfin.append(nf)
    return GroupResult(cfgs=cfgs, metrics=out, diverged_step=div_steps, nonfinite=nonfin,
                       wall_s=time.perf_counter() - t0, compile_s=compile_s,
                       env_steps_per_s=total * len(pairs) / max(run_s, 1e-9), compiles=loop.compiles,
                       extras=[{} for _ in cfgs], value_metric=loop.value_metric, bounds=bounds,
                       compile_cache_hits=cache_hits)


# ---------------------------------------------------------------------------------------------
# pieces both loops share


@contextlib.contextmanager
def frozen_heap():
    """Keep Python's cycle collector off the objects that exist before the loop starts.

    Every call returns fresh arrays and pytrees, so collections run often, and each older-
    generation collection would rescan every long-lived object of jax, flax and gymnasium.
    ``gc.freeze`` (as long-running servers use it) moves them out of the collector's sight; the
    loop's own garbage is still collected. About a quarter less time per env step here.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Observer:
    """Observations as the agent sees them: cast to its dtype and, with ``env.normalize_obs``,
    normalised by running moments (clipped to +-10, as gymnasium's NormalizeObservation) that
    training updates and evaluation only reads. Replay keeps observations as normalised when they
    were stored; the moments settle early, so old and new entries differ little."""

    def __init__(self, env: genv.GymnasiumEnv, normalize: bool):
        self.dtype = env.obs_dtype
        self.normalize = normalize and not env.image
        self.state = genv.normalizer_init(env.obs_shape) if self.normalize else None

    def train(self, obs: np.ndarray, next_obs: np.ndarray):
        """(obs to act on, true next obs) after a training step; updates the moments first."""
        if not self.normalize:
            if obs.dtype != self.dtype:
                return obs.astype(self.dtype), next_obs.astype(self.dtype)
            return obs, next_obs
        self.state = genv.normalizer_update(self.state, obs)
        return genv.normalize(self.state, obs), genv.normalize(self.state, next_obs)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.normalize:
            return genv.normalize(self.state, obs)
        return np.asarray(obs, self.dtype)


def greedy_return(env: genv.GymnasiumEnv, envs: list, policy: Callable, observe: Observer, seeds: list) -> float:
    """Mean undiscounted return of one episode in each of ``envs`` (reset with ``seeds``), run in
    parallel with one policy call per step for all of them; each ends at its first termination or
    truncation (the env's own time limit)."""
    obs = np.stack([e.reset(seed=s)[0] for e, s in zip(envs, seeds)])
    ret = np.zeros(len(envs))
    alive = np.ones(len(envs), bool)
    while alive.any():
        action = env.to_env_action(np.asarray(policy(observe(obs))))
        for i in np.flatnonzero(alive):
            o, r, terminated, truncated, _ = envs[i].step(action[i])
            obs[i] = o
            ret[i] += r
            alive[i] = not (terminated or truncated)
    return float(ret.mean())


def open_envs(env: genv.GymnasiumEnv, cfg, seed: int):
    """One seed's envs: the training vector env (sub-env i seeded ``seed * num_envs + i``), the
    ``train.eval_episodes`` evaluation envs, the observer, and the first observations as the
    agent sees them."""
    n = cfg.env.num_envs
    envs = env.make_vector(n)
    eval_envs = [env.make() for _ in range(cfg.train.eval_episodes)]
    observe = Observer(env, cfg.env.normalize_obs)
    obs, _ = envs.reset(seed=[seed * n + i for i in range(n)])
    obs, _ = observe.train(obs, obs)
    return envs, eval_envs, observe, obs


def close_envs(envs, eval_envs: list) -> None:
    envs.close()
    for e in eval_envs:
        e.close()


def eval_seeds(seed: int, index: int, n: int) -> list[int]:
    """Seeds of the evaluation episodes: fixed by the run's seed and the evaluation's index, apart
    from the training envs' seeds."""
    return [1_000_003 * (seed + 1) + index * n + i for i in range(n)]


def _window_mean(returns: list) -> float:
    return float(np.mean(returns)) if len(returns) else float("nan")


def _aot(fn, *args, donate=()):
    """``fn`` compiled ahead of time for ``args``, with the scan loop's XLA options (``runtime``)."""
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile(runtime.compiler_options(jax.default_backend()))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class Packer:
    """A pytree of small arrays as one flat array per dtype, and back.

    Every argument and result of a compiled call costs the host a little (about 1.5 us per array
    here); the DQN learner (parameters, target, optimizer state, keys, metric sums) is ~35 small
    arrays and hyper-parameters another ~10, so the host loop hands them over packed, 2-3 arrays
    each. Unpacking inside a compiled function is slicing, which XLA fuses into the consumers;
    ``unpack`` also works on the host on fetched NumPy arrays.
    """

    def __init__(self, tree):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.specs = [(jnp.dtype(x.dtype), tuple(x.shape)) if hasattr(x, "dtype") else
                      (jnp.asarray(x).dtype, ()) for x in leaves]
        self.dtypes = sorted({d for d, _ in self.specs}, key=str)

    def pack(self, tree) -> tuple:
        leaves = jax.tree.leaves(tree)
        return tuple(jnp.concatenate([jnp.ravel(jnp.asarray(x, d)) for x, (d, _) in zip(leaves, self.specs)
                                      if d == dt]) for dt in self.dtypes)

    def unpack(self, flat: tuple):
        offsets, out = [0] * len(self.dtypes), []
        for d, shape in self.specs:
            i, size = self.dtypes.index(d), int(np.prod(shape, dtype=np.int64))
            out.append(flat[i][offsets[i]:offsets[i] + size].reshape(shape))
            offsets[i] += size
        return jax.tree.unflatten(self.treedef, out)


# ---------------------------------------------------------------------------------------------
# DQN


@flax.struct.dataclass
class Learner:
    """What lives on the device between calls: the agent, its replay buffer, keys, metric sums."""

    agent: Any
    buffer: replay.ReplayState
    key: jax.Array       # sampling
    act_key: jax.Array   # exploration (folded with the block index)
    acc: dict            # metric sums over the logging block so far


def _zero_acc():
    z = jnp.zeros((), jnp.float32)
    return {"loss": z, "grad_norm": z, "learned": z, "q_mean": z, "iters": z, "q_max_abs": z}


class DQNLoop:
    """DQN on gymnasium envs: the scan loop's iteration (``train_every`` vector steps, one replay
    write, one update) with the env steps taken on the host."""

    value_metric = "q_max_abs"
    compiles = 6

    def __init__(self, cfg, env: genv.GymnasiumEnv):
        from rlstop.agents import dqn
        from rlstop.networks import ConvQNetwork

        if not env.discrete:
            raise UserError(f"DQN needs a discrete action space; {env.id} has a Box action space "
                            "(use agent.kind=ppo or a2c)")
        a = cfg.agent
        self.cfg, self.env = cfg, env
        self.agent = agent = dqn.DQN(a, env.obs_shape, env.num_actions)
        if env.image:  # images: the Nature CNN before the MLP (agent.hidden_sizes, 512 in the paper)
            agent.network = ConvQNetwork(env.num_actions, tuple(a.hidden_sizes), a.activation, a.layer_norm)
        self.sync_due = dqn.sync_due
        n = cfg.env.num_envs
        self.num_envs = n
        self.steps_per_iter = a.train_every * n
        self.iters_per_block = cfg.train.log_every // self.steps_per_iter
        self.vsteps_per_block = cfg.train.log_every // n

        hp = dqn.hparams(a)
        key = jax.random.PRNGKey(0)
        obs = np.zeros((n,) + env.obs_shape, env.obs_dtype)
        learner = jax.eval_shape(self._init, key, hp)
        # The state between calls: (small, buffer). ``small`` packs the agent, keys and metric
        # sums (Packer); the replay buffer stays as its own arrays, donated and written in place.
        self.small = Packer((learner.agent, learner.key, learner.act_key, learner.acc))
        self.hp = Packer(hp)
        small = jax.eval_shape(self.small.pack, (learner.agent, learner.key, learner.act_key, learner.acc))
        hp_flat = jax.eval_shape(self.hp.pack, hp)
        chunk = Transition(np.zeros((self.steps_per_iter,) + env.obs_shape, env.obs_dtype),
                           np.zeros(self.steps_per_iter, np.int32), np.zeros(self.steps_per_iter, np.float32),
                           np.zeros(self.steps_per_iter, bool),
                           np.zeros((self.steps_per_iter,) + env.obs_shape, env.obs_dtype))
        self.init = _aot(self._init_packed, key, hp)
        self.schedule = _aot(self._schedule, small, np.int32(0), hp_flat)
        self.act = _aot(self._greedy, small, obs)
        # Whether learning has started is known on the host: two compiled functions, not a cond.
        self.learn, self.fill = (_aot(functools.partial(self._learn, learning=on), small, learner.buffer,
                                      _abstract(chunk), np.int32(0), True, hp_flat, donate=(0, 1))
                                 for on in (True, False))
        e = cfg.train.eval_episodes
        self.greedy = _aot(self._greedy, small, np.zeros((e,) + env.obs_shape, env.obs_dtype))

    # -- the device side ------------------------------------------------------------------------
    def _init(self, key, hp) -> Learner:
        k_agent, k_learn, k_act = jax.random.split(key, 3)
        shape, dtype = self.env.obs_shape, self.env.obs_dtype
        example = Transition(jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), jnp.zeros(()),
                             jnp.zeros((), jnp.bool_), jnp.zeros(shape, dtype))
        return Learner(self.agent.init(k_agent, hp), replay.init(example, self.cfg.agent.buffer_size),
                       k_learn, k_act, _zero_acc())

    def _init_packed(self, key, hp):
        learner = self._init(key, hp)
        return self.small.pack((learner.agent, learner.key, learner.act_key, learner.acc)), learner.buffer

    def _greedy(self, small, obs):
        return self.agent.greedy(self.small.unpack(small)[0].params, obs)

    def _schedule(self, small, block, hp_flat):
        """The exploring half of epsilon-greedy for every vector step of logging block ``block``:
        (explore [V, N], random actions [V, N]), from the uniform draws ``DQN.act`` makes with
        the step's key (one key per vector step) and epsilon at the global step count, as the
        scan loop computes it."""
        v, n = self.vsteps_per_block, self.num_envs
        act_key, hp = self.small.unpack(small)[2], self.hp.unpack(hp_flat)
        steps = block * self.cfg.train.log_every + jnp.arange(v) * n
        eps = self.agent.epsilon(steps, hp, self.cfg.train.total_steps).astype(jnp.float32)
        keys = jax.random.split(jax.random.fold_in(act_key, block), v)
        u = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys)
        return jax.vmap(self.agent.explore)(u, eps)

    def _learn(self, small, buffer, trans: Transition, steps_before, fresh, hp_flat, *, learning: bool):
        """The scan loop's iteration after its env steps: replay write, sample, and an update once
        learning has started (CleanRL: after ``learning_starts`` env steps), else only the value
        estimates of the sample; metric sums of the block (restarted where ``fresh``)."""
        a, agent, hp = self.cfg.agent, self.agent, self.hp.unpack(hp_flat)
        agent_state, key, act_key, acc0 = self.small.unpack(small)
        learner = Learner(agent_state, buffer, key, act_key, acc0)
        key, k_sample = jax.random.split(learner.key)
        buffer = replay.add(learner.buffer, trans, steps_before)
        steps_after = steps_before + self.steps_per_iter
        batch = replay.sample(buffer, k_sample, a.batch_size, steps_after)
        acc = jax.tree.map(lambda x: jnp.where(fresh, jnp.zeros_like(x), x), learner.acc)
        if learning:
            sync = self.sync_due(steps_before, steps_after, hp["target_update_period"])
            state, m = agent.update(learner.agent, batch, hp, sync)
            acc = {**acc, "loss": acc["loss"] + m["loss"], "grad_norm": acc["grad_norm"] + m["grad_norm"],
                   "learned": acc["learned"] + 1.0}
        else:  # no update, but the value estimates are real
            state, m = learner.agent, agent.q_stats(learner.agent.params, batch.obs)
        acc = {**acc, "q_mean": acc["q_mean"] + m["q_mean"], "iters": acc["iters"] + 1.0,
               "q_max_abs": jnp.maximum(acc["q_max_abs"], m["q_max_abs"])}
        acc = jax.tree.map(lambda x, old: x.astype(old.dtype), acc, learner.acc)  # same types in as out (x64)
        return self.small.pack((state, key, learner.act_key, acc)), buffer

    # -- the host side --------------------------------------------------------------------------
    def run(self, cfg, seed: int, n_blocks: int, blocks_per_eval: int, report: Callable) -> tuple[dict, Learner]:
        """One seed of one run: metrics per logging block, and the final device state."""
        from rlstop.agents.dqn import hparams

        env, n, t_every = self.env, self.num_envs, cfg.agent.train_every
        hp = hparams(cfg.agent)
        small, buffer = self.init(jax.random.PRNGKey(seed), hp)
        hp_flat = jax.device_put(self.hp.pack(hp))
        envs, eval_envs, observe, obs = open_envs(env, cfg, seed)
        shape, dtype = env.obs_shape, env.obs_dtype
        act, learn, fill, to_env, step = self.act, self.learn, self.fill, env.to_env_action, genv.step_vector
        out = {k: np.full(n_blocks, np.nan) for k in ("episode_return", "eval_return", "loss", "grad_norm",
                                                       "q_mean", "q_max_abs")}
        for b in range(n_blocks):
            explore, random = jax.device_get(self.schedule(small, np.int32(b), hp_flat))
            every = explore.all(axis=1)
            ended: list = []
            for it in range(self.iters_per_block):
                steps_before = b * cfg.train.log_every + it * self.steps_per_iter
                o = np.empty((t_every, n) + shape, dtype)
                nxt = np.empty((t_every, n) + shape, dtype)
                acts = np.empty((t_every, n), np.int32)
                rew = np.empty((t_every, n), np.float32)
                term = np.empty((t_every, n), bool)
                v0 = it * t_every
                for j in range(t_every):
                    o[j] = obs
                    v = v0 + j
                    if every[v]:  # every env explores: no network call
                        action = random[v]
                    else:
                        action = np.asarray(act(small, obs))
                        if n > 1:
                            action = np.where(explore[v], random[v], action)
                    obs, next_obs, r, te, _, done = step(envs, to_env(action))
                    obs, next_obs = observe.train(obs, next_obs)
                    acts[j], rew[j], term[j], nxt[j] = action, r, te, next_obs
                    if len(done):
                        ended.extend(done)
                trans = Transition(o.reshape((-1,) + shape), acts.reshape(-1), rew.reshape(-1), term.reshape(-1),
                                   nxt.reshape((-1,) + shape))
                step_fn = learn if steps_before >= cfg.agent.learning_starts else fill
                small, buffer = step_fn(small, buffer, trans, np.int32(steps_before), it == 0, hp_flat)
            acc = self.small.unpack(jax.device_get(small))[3]
            out["episode_return"][b] = _window_mean(ended)
            out["loss"][b] = acc["loss"] / acc["learned"] if acc["learned"] else np.nan
            out["grad_norm"][b] = acc["grad_norm"] / acc["learned"] if acc["learned"] else np.nan
            out["q_mean"][b] = acc["q_mean"] / acc["iters"]
            out["q_max_abs"][b] = acc["q_max_abs"]
            if (b + 1) % blocks_per_eval == 0:
                policy = lambda x, small=small: self.greedy(small, x)  # noqa: E731
                out["eval_return"][b] = greedy_return(env, eval_envs, policy, observe,
                                                      eval_seeds(seed, b // blocks_per_eval, len(eval_envs)))
            report((b + 1) * cfg.train.log_every)
        close_envs(envs, eval_envs)
        agent_state, key, act_key, acc = self.small.unpack(small)
        return out, Learner(agent_state, buffer, key, act_key, acc)


@flax.struct.dataclass
class ACLearner:
    agent: Any
    key: jax.Array       # updates (minibatch shuffles)
    act_key: jax.Array   # action noise (folded with the block index)
    acc: dict            # metric sums over the logging block so far, and their count


class ActorCriticLoop:
    """A2C / PPO on gymnasium envs: the on-policy scan loop's iteration (a rollout of
    ``agent.num_steps`` vector steps, then the agent's update on it) with the env steps taken on
    the host. The action noise of a logging block comes from one call (``action_noise``), so an
    act call is the policy alone."""

    value_metric = "value_max_abs"
    compiles = 5

    def __init__(self, cfg, env: genv.GymnasiumEnv):
        from rlstop.agents import actor_critic as ac

        if env.image:
            raise UserError(f"agent.kind={cfg.agent.kind} has no convolutional torso for the image observations "
                            f"of {env.id}; use agent.kind=dqn (Nature CNN) for Atari")
        a = cfg.agent
        n = cfg.env.num_envs
        self.cfg, self.env, self.num_envs = cfg, env, n
        self.agent = agent = ac.ActorCriticAgent(a, env, n, cfg.train.total_steps)
        self.rollout_cls = ac.Rollout
        self.steps_per_iter = a.num_steps * n
        self.iters_per_block = cfg.train.log_every // self.steps_per_iter

        hp = ac.hparams(a)
        key = jax.random.PRNGKey(0)
        obs = np.zeros((n,) + env.obs_shape, env.obs_dtype)
        learner = jax.eval_shape(self._init, key, hp)
        noise = jax.eval_shape(self._noise, learner.act_key, np.int32(0))
        self.init = _aot(self._init, key, hp)
        self.noise = _aot(self._noise, learner.act_key, np.int32(0))
        step_noise = jax.ShapeDtypeStruct(noise.shape[1:], noise.dtype)
        self.act = _aot(agent.act, learner.agent.params, obs, step_noise)
        action, env_action, logp = jax.eval_shape(agent.act, learner.agent.params, obs, step_noise)
        self.action_spec = (action, env_action)
        t = a.num_steps
        shape, dtype = env.obs_shape, env.obs_dtype
        rollout = ac.Rollout(jax.ShapeDtypeStruct((t, n) + shape, dtype),
                             jax.ShapeDtypeStruct((t,) + action.shape, action.dtype),
                             jax.ShapeDtypeStruct((t, n), jnp.float32), jax.ShapeDtypeStruct((t, n), jnp.float32),
                             jax.ShapeDtypeStruct((t, n), jnp.bool_), jax.ShapeDtypeStruct((t, n), jnp.bool_),
                             jax.ShapeDtypeStruct((t, n) + shape, dtype))
        self.learn = _aot(self._learn, learner, rollout, True, hp, donate=(0,))
        e = cfg.train.eval_episodes
        self.greedy = _aot(agent.greedy, learner.agent.params, np.zeros((e,) + shape, dtype))

    # -- the device side ------------------------------------------------------------------------
    def _init(self, key, hp) -> ACLearner:
        k_agent, k_update, k_act = jax.random.split(key, 3)
        state = self.agent.init(k_agent, hp)
        return ACLearner(state, k_update, k_act, self._zero_acc(state, hp))

    def _zero_acc(self, state, hp):
        t, n = self.cfg.agent.num_steps, self.num_envs
        shape = self.env.obs_shape
        dummy = jax.eval_shape(lambda: self.agent.act(state.params, jnp.zeros((n,) + shape), self.agent.action_noise(
            jax.random.PRNGKey(0), (n,))))
        rollout = self.rollout_cls(jnp.zeros((t, n) + shape), jnp.zeros((t,) + dummy[0].shape, dummy[0].dtype),
                                   jnp.zeros((t, n)), jnp.zeros((t, n)), jnp.zeros((t, n), jnp.bool_),
                                   jnp.zeros((t, n), jnp.bool_), jnp.zeros((t, n) + shape))
        names = jax.eval_shape(self.agent.update, state, rollout, self._shuffle(jax.random.PRNGKey(0)), hp)[1]
        acc = {k: jnp.zeros((), jnp.float32) for k in names}
        acc["_count"] = jnp.zeros((), jnp.float32)
        return acc

    def _noise(self, act_key, block):
        """The action noise of every vector step of logging block ``block``: [steps, N, ...]."""
        v = self.iters_per_block * self.cfg.agent.num_steps
        return self.agent.action_noise(jax.random.fold_in(act_key, block), (v, self.num_envs))

    def _shuffle(self, key):
        """The update's minibatch shuffles (``ActorCriticAgent.update``)."""
        return jax.random.uniform(key, (self.cfg.agent.num_epochs, self.num_envs))

    def _learn(self, learner: ACLearner, rollout, fresh, hp) -> ACLearner:
        """The agent's update on one rollout, and the metric sums of the block (the scan loop
        averages every metric over the block's gradient steps, and takes the max of value_max_abs)."""
        key, k_update = jax.random.split(learner.key)
        state, m = self.agent.update(learner.agent, rollout, self._shuffle(k_update), hp)
        acc = jax.tree.map(lambda x: jnp.where(fresh, jnp.zeros_like(x), x), learner.acc)
        new = {k: (jnp.maximum(acc[k], jnp.max(v)) if k == "value_max_abs" else acc[k] + jnp.mean(v))
               for k, v in m.items()}
        new["_count"] = acc["_count"] + 1.0
        new = jax.tree.map(lambda x, old: x.astype(old.dtype), new, learner.acc)  # same types in as out (x64)
        return learner.replace(agent=state, key=key, acc=new)

    # -- the host side --------------------------------------------------------------------------
    def run(self, cfg, seed: int, n_blocks: int, blocks_per_eval: int, report: Callable) -> tuple[dict, ACLearner]:
        """One seed of one run: metrics per logging block, and the final device state."""
        from rlstop.agents.actor_critic import hparams

        env, n, t_steps = self.env, self.num_envs, cfg.agent.num_steps
        hp = hparams(cfg.agent)
        learner = self.init(jax.random.PRNGKey(seed), hp)
        envs, eval_envs, observe, obs = open_envs(env, cfg, seed)
        shape, dtype = env.obs_shape, env.obs_dtype
        action_spec, env_action_spec = self.action_spec
        act, learn, to_env, step = self.act, self.learn, env.to_env_action, genv.step_vector
        names = [k for k in jax.device_get(learner.acc) if k != "_count"]
        out = {k: np.full(n_blocks, np.nan) for k in ["episode_return", "eval_return", *names]}
        for b in range(n_blocks):
            noise = np.asarray(self.noise(learner.act_key, np.int32(b)))
            ended: list = []
            for it in range(self.iters_per_block):
                o = np.empty((t_steps, n) + shape, dtype)
                nxt = np.empty((t_steps, n) + shape, dtype)
                acts = np.empty((t_steps,) + action_spec.shape, action_spec.dtype)
                logps = np.empty((t_steps, n), np.float32)
                rew = np.empty((t_steps, n), np.float32)
                term = np.empty((t_steps, n), bool)
                trunc = np.empty((t_steps, n), bool)
                params = learner.agent.params
                v0 = it * t_steps
                for j in range(t_steps):
                    o[j] = obs
                    action, env_action, logp = jax.device_get(act(params, obs, noise[v0 + j]))
                    obs, next_obs, r, te, tr, done = step(envs, to_env(env_action))
                    obs, next_obs = observe.train(obs, next_obs)
                    acts[j], logps[j], rew[j], term[j], trunc[j], nxt[j] = action, logp, r, te, tr, next_obs
                    if len(done):
                        ended.extend(done)
                learner = learn(learner, self.rollout_cls(o, acts, logps, rew, term, trunc, nxt), it == 0, hp)
            acc = jax.device_get(learner.acc)
            out["episode_return"][b] = _window_mean(ended)
            for k in names:
                out[k][b] = acc[k] if k == "value_max_abs" else acc[k] / acc["_count"]
            if (b + 1) % blocks_per_eval == 0:
                params = learner.agent.params
                out["eval_return"][b] = greedy_return(env, eval_envs, lambda x: self.greedy(params, x), observe,
                                                      eval_seeds(seed, b // blocks_per_eval, len(eval_envs)))
            report((b + 1) * cfg.train.log_every)
        close_envs(envs, eval_envs)
        return out, learner
