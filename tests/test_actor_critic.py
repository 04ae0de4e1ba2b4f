"""A2C / PPO: targets as hand-computed, the gradient through every switch, one compile for all
switch settings, discrete and Gaussian policies, and a short learning run."""
import itertools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlstop import config as config_lib
from rlstop.agents import actor_critic as ac
from rlstop.errors import UserError
from rlstop.train import driver

OBS, B, T, GAMMA, LAMBDA = 3, 2, 6, 0.9, 0.8
SWITCHES = ("stop_gradient_advantage", "stop_gradient_target", "target_network",
            "stop_gradient_critic_features", "stop_gradient_actor_features")
DISCRETE_ENV = SimpleNamespace(obs_shape=(OBS,), discrete=True, num_actions=2, max_episode_steps=4)
GAUSS_ENV = SimpleNamespace(obs_shape=(OBS,), discrete=False, action_shape=(1,), max_episode_steps=4,
                            action_low=-jnp.ones(1), action_high=jnp.ones(1))


def make_agent(env=DISCRETE_ENV, **kw):
    cfg = ac.ActorCriticConfig(**{"hidden_sizes": [8], "gamma": GAMMA, "gae_lambda": LAMBDA, "num_steps": T,
                                  "num_epochs": 2, "num_minibatches": 1, **kw})
    return cfg, ac.ActorCriticAgent(cfg, env, num_envs=B, total_steps=1000)


def hp_with(cfg, **values):
    hp = ac.hparams(cfg)
    hp.update({k: jnp.asarray(v, hp[k].dtype) for k, v in values.items()})
    return hp


def make_batch(key, discrete=True):
    """Env-major [B, T]: env 0 terminates at t=1, env 1 is truncated at t=3 (its final_obs
    differs from the next obs, which is a reset one)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    obs = jax.random.normal(k1, (B, T, OBS))
    final_obs = jnp.concatenate([obs[:, 1:], jax.random.normal(k2, (B, 1, OBS))], axis=1)
    terminated = jnp.zeros((B, T), bool).at[0, 1].set(True)
    truncated = jnp.zeros((B, T), bool).at[1, 3].set(True)
    final_obs = final_obs.at[0, 1].set(jax.random.normal(k3, (OBS,))).at[1, 3].set(jax.random.normal(k4, (OBS,)))
    action = (jnp.arange(B * T).reshape(B, T) % 2 if discrete else
              jax.random.normal(k4, (B, T, 1)))
    reward = jnp.linspace(-1.0, 2.0, B * T).reshape(B, T)
    return ac.Rollout(obs, action, jnp.full((B, T), -0.7), reward, terminated, truncated, final_obs)


TERMS = ("actor_loss", "critic_loss", "entropy")


class Fixture:
    """An agent, two parameter draws (online and target), a batch, and jitted init / loss /
    gradients / update, each compiled once for all the tests that use the fixture (switches and
    hyperparameters are traced arguments)."""

    def __init__(self, seed, env=DISCRETE_ENV, **kw):
        self.cfg, self.agent = make_agent(env, **kw)
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
        init = jax.jit(self.agent.init)
        self.state = init(k1, ac.hparams(self.cfg))
        self.params = self.state.params
        self.target = init(k2, ac.hparams(self.cfg)).params  # differs from the online critic
        self.batch = make_batch(k3, env.discrete)
        self.rollout = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), self.batch)  # time-major
        self.aux = jax.jit(make_aux, static_argnums=0)(self.agent, self.params, self.target, self.batch)
        self._loss = jax.jit(self.agent.loss)
        self._grads = jax.jit(self._all_grads)
        self.traces = []
        self.update = jax.jit(self._update)

    def _update(self, state, rollout, hp):
        self.traces.append(1)
        shuffle = jax.random.uniform(jax.random.PRNGKey(2), (self.cfg.num_epochs, B))
        return self.agent.update(state, rollout, shuffle, hp)

    def _all_grads(self, params, batch, aux, hp):
        """Jacobian of (actor_loss, critic_loss, entropy) w.r.t. (params, bootstrap observations)."""
        def terms(p, boot_obs):
            m = self.agent.loss(p, batch, aux.replace(boot=aux.boot.replace(obs=boot_obs)), hp)[1]
            return jnp.stack([m[k] for k in TERMS])
        return jax.jacrev(terms, argnums=(0, 1))(params, aux.boot.obs)

    def metrics(self, **values):
        return self._loss(self.params, self.batch, self.aux, hp_with(self.cfg, **values))[1]

    def grad(self, term, wrt="params", **values):
        """Gradient of one term of the loss w.r.t. the parameters or the bootstrap observations."""
        g = self._grads(self.params, self.batch, self.aux, hp_with(self.cfg, **values))
        return jax.tree.map(lambda x: x[TERMS.index(term)], g[0 if wrt == "params" else 1])


@pytest.fixture(scope="module")
def separate():
    return Fixture(0)


@pytest.fixture(scope="module")
def shared():
    return Fixture(1, shared_torso=True)


@pytest.fixture(scope="module")
def gaussian():
    return Fixture(2, GAUSS_ENV, shared_torso=True)


def make_aux(agent, params, target, batch):
    boot = ac.bootstrap_rows(batch.final_obs, batch.truncated, agent.max_bootstrap_rows)
    v = lambda p, x: agent.values(p, x.reshape(-1, OBS)).reshape(x.shape[:-1])  # noqa: E731
    v_target = ac.next_values(v(target, batch.obs), v(target, boot.obs), boot)
    return ac.Aux(v(params, batch.obs), v_target, boot)


def norm(tree):
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Targets.

def test_bootstrap_rows_pick_truncated_and_last_steps():
    final_obs = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1)
    truncated = jnp.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]], bool)
    boot = ac.bootstrap_rows(final_obs, truncated, 2)
    np.testing.assert_array_equal(boot.obs[..., 0], [[1.0, 4.0], [9.0, 0.0]])  # unused rows are 0
    np.testing.assert_array_equal(boot.use, [[0, 1, 0, 0, 1], [0, 0, 0, 0, 1]])
    v_obs = jnp.array([[10.0, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    v_rows = jnp.array([[-1.0, -4.0], [-9.0, 0.0]])
    # V(s'_t) = V(obs[t+1]) unless the step was truncated or is the last one.
    np.testing.assert_array_equal(ac.next_values(v_obs, v_rows, boot),
                                  [[11, -1, 13, 14, -4], [21, 22, 23, 24, -9]])


def hand_returns(agent, params, boot_params, batch):
    """V(s) and lambda-returns by the textbook recursion, with V(s') evaluated on every step's
    true next observation (no bootstrap-row bookkeeping), in numpy:

        G_t = r_t + gamma (1 - term_t) ((1 - lambda c_t) V(s'_t) + lambda c_t G_{t+1}),  c = 1 - done
    """
    v = lambda p, x: np.asarray(agent.values(p, x.reshape(-1, OBS))).reshape(x.shape[:-1])  # noqa: E731
    v_s, v_next = v(params, batch.obs), v(boot_params, batch.final_obs)
    r, term = np.asarray(batch.reward), np.asarray(batch.terminated, np.float32)
    cont = 1.0 - np.asarray(batch.terminated | batch.truncated, np.float32)
    g = np.zeros((B, T))
    for b in range(B):
        nxt = v_next[b, -1]
        for t in reversed(range(T)):
            lc = LAMBDA * cont[b, t]
            nxt = g[b, t] = r[b, t] + GAMMA * (1 - term[b, t]) * ((1 - lc) * v_next[b, t] + lc * nxt)
    return v_s, g


@pytest.mark.parametrize("target_network", [False, True])
def test_critic_loss_matches_hand_computed_lambda_returns(separate, target_network):
    f = separate
    v_s, g = hand_returns(f.agent, f.params, f.target if target_network else f.params, f.batch)
    m = f.metrics(target_network=target_network, value_clip_epsilon=0.0)
    np.testing.assert_allclose(m["critic_loss"], np.mean(0.5 * (v_s - g) ** 2), rtol=1e-5)


def test_a2c_actor_loss_is_plain_policy_gradient(separate):
    f = separate
    v_s, g = hand_returns(f.agent, f.params, f.params, f.batch)
    logits = np.asarray(f.agent.network.apply(f.params, f.batch.obs.reshape(-1, OBS))[0])
    logp = np.asarray(jax.nn.log_softmax(logits))[np.arange(B * T), np.asarray(f.batch.action).reshape(-1)]
    m = f.metrics(clip_epsilon=0.0, normalize_advantages=False)
    np.testing.assert_allclose(m["actor_loss"], -np.mean(logp * (g - v_s).reshape(-1)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The gradient through every switch: exactly zero when detached, non-zero when not.

CRITIC = ("critic_torso", "value_head")
ACTOR = ("actor_torso", "policy_head")


def part(grads, names):
    return {k: v for k, v in grads["params"].items() if k in names}


@pytest.mark.parametrize("normalize", [False, True])
def test_stop_gradient_advantage(separate, normalize):
    on = separate.grad("actor_loss", normalize_advantages=normalize)
    off = separate.grad("actor_loss", normalize_advantages=normalize, stop_gradient_advantage=False)
    assert norm(part(on, CRITIC)) == 0.0      # detached: the policy loss never reaches the critic
    assert norm(part(off, CRITIC)) > 0.0      # attached: it trains the critic through A = G - V(s)
    assert norm(part(on, ACTOR)) > 0.0


def test_stop_gradient_target(separate):
    g = lambda **kw: separate.grad("critic_loss", wrt="boot", **kw)  # noqa: E731
    gp = lambda **kw: separate.grad("critic_loss", **kw)  # noqa: E731
    # Detached: no gradient reaches the true next observations the targets bootstrap from.
    assert norm(g()) == 0.0
    # Not detached: the residual gradient flows through V(s') into its input ...
    assert norm(g(stop_gradient_target=False)) > 0.0
    # ... and changes the critic's gradient.
    assert norm(jax.tree.map(jnp.subtract, gp(), gp(stop_gradient_target=False))) > 0.0
    # With the target network, V(s') is the target critic's (data): nothing flows either way.
    assert norm(g(stop_gradient_target=False, target_network=True)) == 0.0


def test_target_network_changes_the_targets(separate):
    online = separate.metrics()["critic_loss"]
    with_target = separate.metrics(target_network=True)["critic_loss"]
    assert float(online) != float(with_target)


@pytest.mark.parametrize("flag", [True, False])
def test_stop_gradient_critic_features(shared, flag):
    g = shared.grad("critic_loss", stop_gradient_critic_features=flag)
    assert (norm(part(g, ("torso",))) == 0.0) == flag   # only the actor's losses train the torso
    assert norm(part(g, ("value_head",))) > 0.0


@pytest.mark.parametrize("flag", [True, False])
def test_stop_gradient_actor_features(shared, flag):
    for term in ("actor_loss", "entropy"):
        g = shared.grad(term, stop_gradient_actor_features=flag)
        assert (norm(part(g, ("torso",))) == 0.0) == flag, term
        assert norm(part(g, ("policy_head",))) > 0.0


# ---------------------------------------------------------------------------------------------
# One compile for every switch setting; discrete and Gaussian policies.

def test_every_switch_combination_runs_from_one_compile(shared):
    f = shared  # a shared torso, so that the feature switches act too
    for flags in itertools.product([True, False], repeat=len(SWITCHES)):
        new, metrics = f.update(f.state, f.rollout, hp_with(f.cfg, **dict(zip(SWITCHES, flags))))
        assert all(np.all(np.isfinite(v)) for v in metrics.values()), flags
        assert norm(jax.tree.map(jnp.subtract, new.params, f.state.params)) > 0
    assert len(f.traces) == 1


@pytest.mark.parametrize("env", [DISCRETE_ENV, GAUSS_ENV], ids=["discrete", "gaussian"])
def test_fork_changes_no_value_or_gradient(env, monkeypatch):
    """networks._fork (the two backward chains released together, a scheduling hint) leaves the
    loss, its metrics and its gradient as they are without it, bit for bit."""
    from rlstop import networks

    cfg, agent = make_agent(env)
    hp = ac.hparams(cfg)
    params = jax.jit(agent.init)(jax.random.PRNGKey(0), hp).params
    batch = make_batch(jax.random.PRNGKey(1), env.discrete)
    aux = jax.jit(make_aux, static_argnums=0)(agent, params, params, batch)

    def grads():
        custom = str(jax.make_jaxpr(agent.loss)(params, batch, aux, hp)).count("custom_vjp_call")
        return custom, jax.jit(jax.value_and_grad(agent.loss, has_aux=True))(params, batch, aux, hp)

    n_forked, forked = grads()
    monkeypatch.setattr(networks, "_fork", lambda pi, v, z: (pi, v))
    n_plain, plain = grads()
    assert n_forked == n_plain + 1
    for x, y in zip(jax.tree.leaves(forked), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(x, y)


def test_update_in_one_scan_equals_nested_scans_bit_for_bit():
    """All epochs' minibatches in one scan (a small batch) or a scan per epoch (a batch whose
    gathered copies would exceed the budget): the same state and metrics, bit for bit."""
    cfg = ac.ActorCriticConfig(hidden_sizes=[8], num_steps=T, num_epochs=4, num_minibatches=2)
    flat = ac.ActorCriticAgent(cfg, DISCRETE_ENV, num_envs=B, total_steps=1000)
    nested = ac.ActorCriticAgent(cfg, DISCRETE_ENV, num_envs=B, total_steps=1000, batch=10 ** 9)
    hp = ac.hparams(cfg)
    state = jax.jit(flat.init)(jax.random.PRNGKey(0), hp)
    rollout = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), make_batch(jax.random.PRNGKey(1)))
    shuffle = jax.random.uniform(jax.random.PRNGKey(2), (cfg.num_epochs, B))

    def scan_lengths(agent):
        jaxpr = jax.make_jaxpr(agent.update)(state, rollout, shuffle, hp)
        found = []

        def walk(j):
            for eqn in j.eqns:
                if eqn.primitive.name == "scan":
                    found.append(eqn.params["length"])
                for sub in jax.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr.jaxpr)
        return sorted(found)

    # (T = 6 is the lambda-returns' scan)
    assert 8 in scan_lengths(flat) and 8 not in scan_lengths(nested)  # 4 x 2 steps in one scan
    assert {4, 2} <= set(scan_lengths(nested))  # 4 epochs of 2 minibatches
    outs = [jax.jit(a.update)(state, rollout, shuffle, hp) for a in (flat, nested)]
    for x, y in zip(*(jax.tree.leaves(o) for o in outs)):
        np.testing.assert_array_equal(x, y)


def test_target_sync_every_period_and_polyak(shared):
    f = shared
    hp = hp_with(f.cfg, target_update_period=2, target_tau=0.5)
    s1, _ = f.update(f.state.replace(target_params=f.target), f.rollout, hp)   # update 1: no sync
    for a, b in zip(jax.tree.leaves(s1.target_params), jax.tree.leaves(f.target)):
        np.testing.assert_array_equal(a, b)
    s2, _ = f.update(s1, f.rollout, hp)                                         # update 2: Polyak 0.5
    flat = [dict(jax.tree_util.tree_flatten_with_path(x)[0]) for x in (s2.target_params, f.target, s2.params)]
    assert {path[1].key for path in flat[0]} == {"torso", "policy_head", "value_head"}  # a shared torso
    for path in flat[0]:
        t_new, t_old, p = (x[path] for x in flat)
        if path[1].key in ("torso", "value_head"):  # the target critic moves
            np.testing.assert_allclose(t_new, t_old + 0.5 * (p - t_old), rtol=1e-5, atol=1e-6)
        else:  # the policy part of the target is never read, and stays as it was
            np.testing.assert_array_equal(t_new, t_old)


@pytest.mark.parametrize("env", [DISCRETE_ENV, GAUSS_ENV], ids=["discrete", "gaussian"])
def test_rollout_noise_from_bits_is_gumbel_or_normal_with_shuffles(env):
    """The scan loop's action noise and minibatch shuffles come from random words: standard
    Gumbel (mean: Euler's gamma, variance pi^2 / 6) or standard normal noise, and per-epoch
    shuffle values whose argsort is a permutation of the envs."""
    cfg = ac.ActorCriticConfig(hidden_sizes=[8], num_steps=T, num_epochs=3, num_minibatches=1)
    agent = ac.ActorCriticAgent(cfg, env, num_envs=400, total_steps=1000)
    shape = (250, 400)
    words = agent.rollout_noise_words(shape)
    assert words == (250 * 400 + 3 * 400) * agent.network.action_dim
    bits = jax.random.bits(jax.random.PRNGKey(0), (words,))
    noise, shuffle = jax.jit(agent.rollout_noise, static_argnums=1)(bits, shape)
    assert noise.shape == shape + (agent.network.action_dim,) and shuffle.shape == (3, 400)
    mean, var = (0.5772157, np.pi ** 2 / 6) if env.discrete else (0.0, 1.0)
    assert np.all(np.isfinite(noise))
    np.testing.assert_allclose(jnp.mean(noise), mean, atol=0.01)
    np.testing.assert_allclose(jnp.var(noise), var, rtol=0.01)
    for order in np.asarray(jnp.argsort(shuffle, axis=1)):
        assert sorted(order) == list(range(400)) and list(order) != list(range(400))
    # The extreme words give finite noise (the smallest uniform is clamped above 0, or above -1).
    edge, _ = agent.rollout_noise(jnp.asarray([0, 2 ** 32 - 1] * (words // 2), jnp.uint32), shape)
    assert np.all(np.isfinite(edge))


def test_scan_stacked_equals_scan():
    """Metrics through a scan stacked per dtype and shape come back as a plain scan gives them."""
    from rlstop.agents.scan import scan_stacked

    def f(c, x):
        return c + x, {"b": c * x, "a": jnp.full((2, 3), x), "n": (x > 2).astype(jnp.int32), "c": -c}

    xs = jnp.arange(5.0)
    plain, stacked = jax.lax.scan(f, 1.0, xs), scan_stacked(f, 1.0, xs)
    assert sorted(stacked[1]) == ["a", "b", "c", "n"]
    np.testing.assert_array_equal(plain[0], stacked[0])
    for k in plain[1]:
        assert stacked[1][k].dtype == plain[1][k].dtype
        np.testing.assert_array_equal(plain[1][k], stacked[1][k])


def test_scan_packed_equals_scan():
    """A scan's outputs through one float vector per step come back as a plain scan gives them:
    floats, integers and booleans, bit for bit."""
    from rlstop.agents.scan import scan_packed

    def f(c, x):
        out = {"obs": jnp.stack([c, -c, x]) / 3.0, "action": (x * 7).astype(jnp.int32) % 5, "done": x > 2.5,
               "r": (c * x, jnp.full((2, 2), c))}
        return c * 1.1 + x, out

    xs = jnp.linspace(0.0, 5.0, 7)
    plain, packed = jax.jit(lambda xs: jax.lax.scan(f, 1.0, xs))(xs), jax.jit(lambda xs: scan_packed(f, 1.0, xs))(xs)
    assert jax.tree.structure(plain) == jax.tree.structure(packed)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(packed)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_gaussian_policy_acts_within_bounds_and_greedy_is_the_mean(gaussian):
    agent, params = gaussian.agent, gaussian.params
    obs = jax.random.normal(jax.random.PRNGKey(1), (64, OBS))
    noise = 5.0 * agent.action_noise(jax.random.PRNGKey(2), (64,))
    action, env_action, logp = agent.act(params, obs, noise)
    assert action.shape == (64, 1) and logp.shape == (64,)
    assert float(jnp.max(jnp.abs(env_action))) <= 1.0 < float(jnp.max(jnp.abs(action)))
    mean, _ = agent.network.apply(params, obs, method=ac.ActorCritic.policy)
    np.testing.assert_allclose(agent.greedy(params, obs), jnp.clip(mean, -1, 1))


@pytest.mark.parametrize("kw", [{}, {"shared_torso": True, "layer_norm": True}, {"discrete": False}])
def test_init_params_is_distributed_as_init(kw):
    from rlstop.networks import ActorCritic

    net = ActorCritic(**{"action_dim": 2, "discrete": True, "hidden_sizes": (16, 16), **kw})
    obs = jnp.zeros((1, OBS))
    ref, fast = net.init(jax.random.PRNGKey(0), obs), net.init_params(jax.random.PRNGKey(0), obs)
    assert jax.tree.structure(ref) == jax.tree.structure(fast)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(fast)):
        assert a.shape == b.shape, path
        if path[-1].key != "kernel":  # biases, the log-std, LayerNorm: the same constants
            np.testing.assert_array_equal(a, b)
            continue
        gram = lambda k: k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T  # noqa: E731
        # Orthogonal with the same gain: gain^2 I.
        np.testing.assert_allclose(gram(b), gram(a), atol=1e-5)


def test_vmapped_qr_is_the_plain_qr_one_matrix_at_a_time():
    from rlstop.networks import qr_one_at_a_time

    a = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5, 4))
    got = jax.vmap(jax.vmap(qr_one_at_a_time))(a)
    want = jnp.linalg.qr(a)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    jaxpr = str(jax.make_jaxpr(jax.vmap(qr_one_at_a_time))(a[0]))
    assert "while" in jaxpr or "scan" in jaxpr  # a loop over the batch, not one batched call


def test_many_seed_initialisation_does_not_hang():
    """A vmapped orthogonal initialisation of 256 seeds: with one batched LAPACK QR per kernel
    it deadlocked XLA's 2-thread CPU pool (every time here); it must finish."""
    import subprocess
    import sys

    code = ("import jax, jax.numpy as jnp\n"
            "from rlstop.networks import ActorCritic\n"
            "net = ActorCritic(2, True, (64, 64))\n"
            "f = jax.jit(jax.vmap(lambda k: net.init_params(k, jnp.zeros((1, 4)))))\n"
            "keys = jax.random.split(jax.random.PRNGKey(0), 256)\n"
            "for _ in range(5):\n"
            "    jax.block_until_ready(f(keys))\n"
            "print('done')\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a vmapped initialisation of 256 seeds hung")
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Configs and the loop.

def test_log_every_must_hold_whole_rollouts():
    with pytest.raises(UserError, match=r"train.log_every=1000 must be a multiple of agent.num_steps \* env.num_envs"):
        config_lib.load_config("configs/ppo_cartpole.yaml", ["train.log_every=1000", "train.total_steps=100000"])
    with pytest.raises(UserError, match="env.num_envs=60 must be a multiple of agent.num_minibatches=16"):
        config_lib.load_config("configs/ppo_cartpole.yaml", ["env.num_envs=60"])


def test_a2c_defaults_and_switch_defaults():
    cfg = config_lib.build_config({"agent": {"kind": "a2c"}, "env": {"num_envs": 8},
                                   "train": {"total_steps": 4000, "log_every": 40}})
    assert (cfg.agent.num_epochs, cfg.agent.num_minibatches, cfg.agent.clip_epsilon) == (1, 1, 0.0)
    assert cfg.agent.target_network is False and cfg.agent.stop_gradient_advantage is True


def test_pendulum_gaussian_program_runs():
    cfg = config_lib.load_config("configs/ppo_pendulum.yaml", [
        "env.num_envs=4", "agent.num_steps=8", "agent.num_minibatches=2", "agent.num_epochs=1",
        "train.total_steps=64", "train.log_every=32", "train.eval_episodes=1", "agent.hidden_sizes=[8]"])
    res = driver.run_group([cfg])
    df = res.metrics[0]
    for k in ("actor_loss", "critic_loss", "entropy", "grad_norm", "value_mean", "value_max_abs"):
        assert np.isfinite(df[k]).all(), k
    assert np.isfinite(df["eval_return"]).all()


def test_ppo_learns_cartpole():
    # 98k env steps, 4 epochs, lr 1e-3. Measured (greedy return, 20 episodes) for seeds 0-3:
    # 485, 467, 304, 454; a random policy scores ~20.
    cfg = config_lib.load_config("configs/ppo_cartpole.yaml", [
        "train.total_steps=98304", "train.log_every=8192", "train.eval_every=98304", "train.eval_episodes=20",
        "agent.learning_rate=1e-3", "agent.num_epochs=4"])
    res = driver.run_group([cfg])
    df = res.metrics[0]
    final = df["eval_return"].dropna().iloc[-1]
    assert final >= 200.0, df[["env_steps", "episode_return", "eval_return"]]
