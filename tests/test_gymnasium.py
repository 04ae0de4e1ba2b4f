"""Gymnasium backend: env parity with gymnax, truncation bootstraps from the true final
observation, bad env input gives one error line, and the host loop writes the scan loop's metrics."""
import os
import sys
import textwrap

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from rlstop import config as config_lib
from rlstop.cli import main
from rlstop.envs import gymnasium_env as genv
from rlstop.envs.gymnax_env import GymnaxEnv
from rlstop.train import host
from tests.conftest import TINY_DQN

LIMIT = 3  # the Counter env's time limit


class Counter(gym.Env):
    """obs = [steps since reset]; never terminates, so every episode ends by truncation at LIMIT."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, False, False, {}


gym.register("rlstop_test/Counter-v0", entry_point=Counter, max_episode_steps=LIMIT)


def _time_limit(env):
    while not isinstance(env, gym.wrappers.TimeLimit):
        env = env.env
    return env


def test_gymnax_step_no_reset_is_the_step_before_its_reset():
    """``step_no_reset`` (evaluation) gives what ``step_with_keys`` gives before resetting:
    the same transition, with the episode's own last observation and state kept at its end."""
    gx = GymnaxEnv("CartPole-v1")
    both = jax.jit(lambda k, s, a: (gx.step_with_keys(k, jax.random.fold_in(k, 1), s, a), gx.step_no_reset(k, s, a)))
    _, state = gx.reset(jax.random.PRNGKey(0))
    ends = 0
    for t in range(60):
        with_reset, no_reset = both(jax.random.PRNGKey(t), state, jnp.int32(1))  # always push right: ends fast
        for a, b in [(with_reset.final_obs, no_reset.obs), (with_reset.final_obs, no_reset.final_obs),
                     (with_reset.reward, no_reset.reward), (with_reset.terminated, no_reset.terminated),
                     (with_reset.truncated, no_reset.truncated)]:
            np.testing.assert_array_equal(a, b)
        if not with_reset.terminated:
            for a, b in zip(jax.tree.leaves(with_reset.state), jax.tree.leaves(no_reset.state)):
                np.testing.assert_array_equal(a, b)
        ends += int(with_reset.terminated)
        state = with_reset.state
    assert ends >= 2


def test_gymnax_resets_drawn_ahead_equal_step_bit_for_bit():
    """``draw_resets`` for a whole rollout, then ``step_with_reset`` at each step, gives what
    ``step_with_keys`` gives with the same keys, resets included."""
    gx = GymnaxEnv("CartPole-v1")
    t, n = 40, 3
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * t * n).reshape(2, t, n, -1)
    _, state0 = jax.vmap(gx.reset)(jax.random.split(jax.random.PRNGKey(1), n))
    action = jnp.ones(n, jnp.int32)  # always push right: episodes end fast

    def rollout(step, xs):
        return jax.lax.scan(lambda s, x: (lambda out: (out.state, out))(jax.vmap(step)(*x, s, action)), state0, xs)[1]

    plain = jax.jit(lambda k: rollout(gx.step_with_keys, (k[0], k[1])))(keys)
    ahead = jax.jit(lambda k: rollout(gx.step_with_reset, (k[0], gx.draw_resets(k[1], (t, n)))))(keys)
    assert int(plain.terminated.sum()) >= 3
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(ahead)):
        np.testing.assert_array_equal(a, b)


def test_cartpole_parity_with_gymnax():
    """From the same states and actions, gymnasium's CartPole and gymnax's give the same
    transitions: next observation, reward, termination, and truncation at the time limit."""
    gx = GymnaxEnv("CartPole-v1")
    step = jax.jit(gx.step)
    env = genv.GymnasiumEnv("CartPole-v1").make()
    _, state = gx.reset(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n = 0
    for trial in range(40):
        s = rng.uniform(-0.2, 0.2, 4).astype(np.float32)  # inside the limits; some near the angle limit
        t0 = 497 if trial % 5 == 0 else 0  # some run into the time limit: truncations
        env.reset(seed=trial)
        env.unwrapped.state = s.astype(np.float64)
        _time_limit(env)._elapsed_steps = t0
        gstate = state.replace(x=jnp.float32(s[0]), x_dot=jnp.float32(s[1]), theta=jnp.float32(s[2]),
                               theta_dot=jnp.float32(s[3]), time=jnp.int32(t0))
        for _ in range(8):
            a = int(rng.integers(2))
            obs, r, terminated, truncated, _ = env.step(a)
            out = step(jax.random.PRNGKey(n), gstate, jnp.int32(a))
            n += 1
            np.testing.assert_allclose(np.asarray(out.final_obs), obs, atol=1e-4)
            assert float(out.reward) == r
            assert bool(out.terminated) == terminated
            assert bool(out.truncated) == (truncated and not terminated)
            if terminated or truncated:
                break
            gstate = out.state
    assert n > 100


def test_vector_step_keeps_final_obs_apart_from_reset_obs():
    envs = genv.GymnasiumEnv("rlstop_test/Counter-v0").make_vector(2)
    obs, _ = envs.reset(seed=[0, 1])
    for t in range(1, LIMIT + 2):
        obs, next_obs, reward, terminated, truncated, ended = genv.step_vector(envs, np.zeros(2, np.int64))
        if t == LIMIT:  # truncated: act next on a new episode's first obs, bootstrap from the last
            np.testing.assert_array_equal(next_obs, [[LIMIT], [LIMIT]])
            np.testing.assert_array_equal(obs, [[0], [0]])
            assert truncated.all() and not terminated.any()
            np.testing.assert_array_equal(ended, [LIMIT, LIMIT])
        else:
            np.testing.assert_array_equal(next_obs, obs)
            assert not truncated.any() and len(ended) == 0


def test_same_step_vector_env_matches_gymnasium_sync_vector_env():
    """SameStepVectorEnv against gymnasium's SyncVectorEnv (SAME_STEP autoreset), 3 CartPole envs,
    the same seeds and random actions for 1,500 steps (many episode ends): the same observations,
    rewards, flags, final observations and episode statistics through ``step_vector``. (Truncation:
    test_vector_step_keeps_final_obs_apart_from_reset_obs.)"""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode
    from gymnasium.wrappers import RecordEpisodeStatistics

    env = genv.GymnasiumEnv("CartPole-v1")
    ours = env.make_vector(3)
    ref = gym.vector.SyncVectorEnv([lambda: RecordEpisodeStatistics(env.make())] * 3,
                                   autoreset_mode=AutoresetMode.SAME_STEP, copy=False)
    assert isinstance(ours, gym.vector.VectorEnv)
    assert ours.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert ours.observation_space == ref.observation_space and ours.action_space == ref.action_space
    np.testing.assert_array_equal(ours.reset(seed=[5, 6, 7])[0], ref.reset(seed=[5, 6, 7])[0])
    rng = np.random.default_rng(0)
    n_ended = 0
    for t in range(1500):
        action = rng.integers(2, size=3)
        a, b = genv.step_vector(ours, action), genv.step_vector(ref, action)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        n_ended += len(a[5])
    assert n_ended > 50
    ours.close()
    ref.close()


def _cfg(env_id, *extra):
    return config_lib.load_config("configs/dqn_cartpole.yaml", [
        *TINY_DQN, f"env.id={env_id}", "env.backend=gymnasium", *extra])


def test_host_loop_stores_true_next_obs_at_truncation_and_is_reproducible():
    """Every transition in replay goes t -> t+1 (never from the last state to a reset), and the
    truncated ones bootstrap (terminated is false). The same seed gives the same run."""
    cfg = _cfg("rlstop_test/Counter-v0", "env.num_envs=2", "agent.learning_starts=100",
               "train.total_steps=400", "train.log_every=200")
    loop = host.DQNLoop(cfg, genv.GymnasiumEnv(cfg.env.id))
    out, learner = loop.run(cfg, 3, 2, 1, lambda done: None)
    data = jax.device_get(learner.buffer.data)
    obs, nxt = data.obs[:400, 0], data.next_obs[:400, 0]
    np.testing.assert_array_equal(nxt, obs + 1)
    assert (nxt == LIMIT).sum() == 400 // LIMIT // 2 * 2 and not data.terminated[:400].any()
    assert np.isfinite(out["loss"][1]) and out["eval_return"][1] == LIMIT
    np.testing.assert_array_equal(out["episode_return"], [LIMIT, LIMIT])
    again, learner2 = loop.run(cfg, 3, 2, 1, lambda done: None)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(learner2.agent.params),
                                     jax.device_get(learner.agent.params)))
    pd.testing.assert_frame_equal(pd.DataFrame(out), pd.DataFrame(again))


@pytest.mark.parametrize("args, expect", [
    (["env.id=NoSuchEnv-v0"], "unknown env id 'NoSuchEnv-v0'"),
    (["env.id=CartPol-v1", "env.backend=gymnasium"], "did you mean CartPole-v1"),
    (["env.id=no_such_module_xyz:Thing-v0"], "no_such_module_xyz"),
    (["env.id=Pendulum-v1", "env.backend=gymnasium"], "DQN needs a discrete action space"),
])
def test_bad_env_gives_one_error_line(tmp_path, capsys, args, expect):
    code = main(["train", "configs/dqn_cartpole.yaml", *args, "--out", str(tmp_path / "runs"), "--quiet"])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0]


def test_module_entry_points(tmp_path, monkeypatch):
    """``module:Id`` imports the module (which registers the id); ``module:Class`` makes the class."""
    (tmp_path / "rlstop_test_envmod.py").write_text(textwrap.dedent("""
        import gymnasium as gym
        from gymnasium.envs.classic_control import CartPoleEnv

        class Pole(CartPoleEnv):
            pass

        gym.register("rlstop_test_mod/Pole-v0", entry_point=Pole, max_episode_steps=7)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    env = genv.GymnasiumEnv("rlstop_test_envmod:rlstop_test_mod/Pole-v0")
    assert env.obs_shape == (4,) and env.num_actions == 2 and env.max_episode_steps == 7
    env = genv.GymnasiumEnv("rlstop_test_envmod:Pole")
    assert env.obs_shape == (4,) and env.discrete
    sys.modules.pop("rlstop_test_envmod", None)


def test_observation_normaliser_matches_batch_moments():
    rng = np.random.default_rng(0)
    xs = rng.normal(3.0, 2.0, (50, 4, 3))
    state = genv.normalizer_init((3,))
    for x in xs:
        state = genv.normalizer_update(state, x)
    flat = xs.reshape(-1, 3)
    np.testing.assert_allclose(state.mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(state.var, flat.var(0), rtol=1e-4)


def test_host_loop_writes_the_scan_loops_metrics(tmp_path, capsys):
    """`rlstop train ... env.backend=gymnasium` writes the same files and columns as the scan loop."""
    frames = {}
    for backend in ("gymnax", "gymnasium"):
        out = tmp_path / backend
        code = main(["train", "configs/dqn_cartpole.yaml", *TINY_DQN, f"env.backend={backend}", "train.seeds=2",
                     "--out", str(out), "--quiet"])
        assert code == 0, capsys.readouterr().err
        run = out / "dqn_cartpole"
        assert {"config.yaml", "metrics.csv", "summary.json"} <= set(os.listdir(run))
        frames[backend] = pd.read_csv(run / "metrics.csv")
    scan, hosted = frames["gymnax"], frames["gymnasium"]
    assert list(hosted.columns) == list(scan.columns)
    pd.testing.assert_frame_equal(hosted[["seed", "env_steps"]], scan[["seed", "env_steps"]])
    assert hosted["eval_return"].notna().all() and hosted["q_max_abs"].notna().all()
    capsys.readouterr()
    # `rlstop eval` of a host-loop run: one line saying why not (it keeps no final checkpoint).
    assert main(["eval", str(tmp_path / "gymnasium" / "dqn_cartpole")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gymnasium backend" in err


def test_actor_critic_host_loop_with_box_actions(tmp_path, capsys):
    """PPO on gymnasium's Pendulum (Box actions) through the host loop: the on-policy scan loop's
    metric columns, finite values, greedy evaluation of whole 200-step episodes."""
    from rlstop.train import onpolicy

    out = tmp_path / "runs"
    code = main(["train", "configs/ppo_pendulum.yaml", "env.backend=gymnasium", "env.num_envs=2",
                 "agent.hidden_sizes=[8]", "agent.num_steps=16", "agent.num_minibatches=1", "agent.num_epochs=1",
                 "train.total_steps=128", "train.log_every=64", "train.eval_episodes=1", "train.seeds=2",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    df = pd.read_csv(out / "ppo_pendulum" / "metrics.csv")
    assert list(df.columns) == ["seed", "env_steps", "episode_return", "eval_return",
                                *sorted(onpolicy.METRICS), "diverged"]
    assert list(df["env_steps"]) == [64, 128, 64, 128] and list(df["seed"]) == [0, 0, 1, 1]
    assert np.isfinite(df[list(onpolicy.METRICS)].to_numpy()).all()
    assert (df["eval_return"] < 0).all()  # Pendulum's rewards are negative; the episode ran to its end
