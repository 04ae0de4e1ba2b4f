"""DQN agent: wiring of targets, the gradient through every switch, one compile for all switches."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlstop import config as config_lib
from rlstop.agents import replay
from rlstop.agents.dqn import DQN, DQNConfig, hparams
from rlstop.agents.replay import Transition

OBS, ACTIONS, B = 3, 2, 5


@pytest.fixture(scope="module")
def setup():
    cfg = DQNConfig(hidden_sizes=[8], gamma=0.9)
    agent = DQN(cfg, (OBS,), ACTIONS)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    state = agent.init(k1, hparams(cfg))
    target = agent.init(k2, hparams(cfg)).params  # target params that differ from the online ones
    batch = Transition(
        obs=jax.random.normal(k3, (B, OBS)),
        action=jnp.array([0, 1, 1, 0, 1]),
        reward=jnp.array([1.0, 0.0, -1.0, 0.5, 2.0]),
        terminated=jnp.array([False, False, True, False, False]),
        next_obs=jax.random.normal(jax.random.fold_in(k3, 1), (B, OBS)),
    )
    return cfg, agent, state, target, batch


def hp_with(cfg, **switches):
    hp = hparams(cfg)
    hp.update({k: jnp.asarray(v) for k, v in switches.items()})
    return hp


def test_loss_matches_hand_computed_targets(setup):
    cfg, agent, state, target, batch = setup
    q = lambda p, x: np.asarray(agent.network.apply(p, x))  # noqa: E731
    q_tm1, q_next_online, q_next_target = q(state.params, batch.obs), q(state.params, batch.next_obs), q(target, batch.next_obs)
    disc = 0.9 * (1 - np.asarray(batch.terminated, np.float32))
    r = np.asarray(batch.reward)
    pred = q_tm1[np.arange(B), np.asarray(batch.action)]
    cases = {
        # (target_network, double_q): bootstrap value of s'
        (True, False): q_next_target.max(1),
        (False, False): q_next_online.max(1),
        (True, True): q_next_target[np.arange(B), q_next_online.argmax(1)],
        (False, True): q_next_online[np.arange(B), q_next_online.argmax(1)],
    }
    for (tn, dq), boot in cases.items():
        expected = np.mean((r + disc * boot - pred) ** 2)
        loss, _ = agent.loss(state.params, target, batch, hp_with(cfg, target_network=tn, double_q=dq))
        np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=f"target_network={tn} double_q={dq}")


def _grads(agent, params, target, batch, hp):
    """Gradients w.r.t. (online params, target params, next observations)."""
    f = lambda p, t, nx: agent.loss(p, t, batch._replace(next_obs=nx), hp)[0]  # noqa: E731
    return jax.grad(f, argnums=(0, 1, 2))(params, target, batch.next_obs)


def _norm(tree):
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("target_network", [True, False])
@pytest.mark.parametrize("double_q", [True, False])
def test_stop_gradient_target(setup, target_network, double_q):
    cfg, agent, state, target, batch = setup
    on = _grads(agent, state.params, target, batch, hp_with(cfg, stop_gradient_target=True,
                                                             target_network=target_network, double_q=double_q))
    off = _grads(agent, state.params, target, batch, hp_with(cfg, stop_gradient_target=False,
                                                              target_network=target_network, double_q=double_q))
    # Detached target: exactly no gradient reaches the next observation.
    assert _norm(on[2]) == 0.0
    # Not detached: the gradient flows through Q(s', .) into its input.
    assert _norm(off[2]) > 0.0


def test_target_network_switch(setup):
    cfg, agent, state, target, batch = setup
    hp = lambda **kw: hp_with(cfg, **kw)  # noqa: E731
    semi = _grads(agent, state.params, target, batch, hp(stop_gradient_target=True, target_network=True))
    resid_tn = _grads(agent, state.params, target, batch, hp(stop_gradient_target=False, target_network=True))
    resid_online = _grads(agent, state.params, target, batch, hp(stop_gradient_target=False, target_network=False))
    # Target parameters never receive gradient.
    assert _norm(semi[1]) == 0.0 and _norm(resid_tn[1]) == 0.0 and _norm(resid_online[1]) == 0.0
    # With a target network, the online gradient is the semi-gradient even when the target is not
    # detached: what flows through the target lands on the (frozen) target parameters.
    for a, b in zip(jax.tree.leaves(semi[0]), jax.tree.leaves(resid_tn[0])):
        np.testing.assert_array_equal(a, b)
    # Without one, the residual gradient through Q(s', .) adds to the online gradient.
    diff = jax.tree.map(lambda a, b: a - b, semi[0], resid_online[0])
    assert _norm(diff) > 0.0


@pytest.mark.parametrize("varying", [frozenset(), frozenset({"stop_gradient_target", "target_network", "double_q"})])
def test_update_gradient_equals_autodiff_of_the_loss(setup, varying):
    """The two-part gradient in ``update`` (with conds, or with selects when the switches vary
    across a batch) is exactly jax.grad of the one-function loss, for every combination."""
    cfg, agent, state, target, batch = setup
    agent = DQN(cfg, (OBS,), ACTIONS, varying)
    for sg, tn, dq in itertools.product([True, False], repeat=3):
        hp = hp_with(cfg, stop_gradient_target=sg, target_network=tn, double_q=dq)
        (l1, _), g1 = agent.gradients(state.params, target, batch, hp)
        (l2, _), g2 = jax.value_and_grad(agent.loss, has_aux=True)(state.params, target, batch, hp)
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"sg={sg} tn={tn} dq={dq}")


@pytest.mark.parametrize("chunk", [None, 1, 3, 6])
def test_vmapped_gradient_with_varying_switches_equals_each_rows_autodiff(setup, chunk, monkeypatch):
    """Under vmap with the switches varying across rows, the residual part goes through
    ``masked_vjp``'s chunked map (chunks that straddle rows of different runs included): every row
    equals jax.grad of its own loss, and rows that do not need it get exactly the semi-gradient."""
    from rlstop.agents import dqn as dqn_module

    cfg, _, state, target, batch = setup
    agent = DQN(cfg, (OBS,), ACTIONS, frozenset({"stop_gradient_target", "target_network"}))
    if chunk is not None:
        monkeypatch.setattr(dqn_module, "_cpu_chunk", lambda n: chunk)
    combos = [(True, True), (False, True), (True, False), (False, False), (False, False), (True, False)]
    hps = [hp_with(cfg, stop_gradient_target=sg, target_network=tn) for sg, tn in combos]
    hp = jax.tree.map(lambda *v: jnp.stack(v), *hps)
    n = len(combos)
    params = jax.tree.map(lambda x: jnp.stack([x * (1 + 0.1 * i) for i in range(n)]), state.params)
    batched = jax.vmap(lambda p, h: agent.gradients(p, target, batch, h)[1])(params, hp)
    for i, (sg, tn) in enumerate(combos):
        p_i = jax.tree.map(lambda x: x[i], params)
        expected = jax.grad(lambda p: agent.loss(p, target, batch, hps[i])[0])(p_i)
        semi_hp = hp_with(cfg, stop_gradient_target=True, target_network=tn)
        semi = jax.grad(lambda p: agent.loss(p, target, batch, semi_hp)[0])(p_i)
        for a, b, c in zip(jax.tree.leaves(batched), jax.tree.leaves(expected), jax.tree.leaves(semi)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6, err_msg=f"row {i}: sg={sg} tn={tn}")
            if sg or tn:
                np.testing.assert_allclose(a[i], c, rtol=1e-5, atol=1e-6)
    # The residual part itself: exactly zero on rows that do not need it, non-zero on the others.
    needs = jnp.array([not sg and not tn for sg, tn in combos])
    ct = jnp.ones((n, B, ACTIONS))
    resid = jax.vmap(agent._residual, in_axes=(0, 0, None, 0))(needs, params, batch.next_obs, ct)
    for i in range(n):
        norm = _norm(jax.tree.map(lambda x: x[i], resid))
        assert (norm > 0.0) if needs[i] else (norm == 0.0), f"row {i}"


@pytest.mark.parametrize("layer_norm", [False, True])
def test_init_is_distributed_as_flax_default_init(layer_norm):
    """DQN's one-draw initialisation has flax's default distribution: lecun_normal kernels (a
    normal truncated at two standard deviations, variance 1 / fan_in), zero biases, unit
    LayerNorm scales; different seeds give different parameters."""
    from rlstop.networks import lecun_normal_init

    net = DQN(DQNConfig(hidden_sizes=[256, 256], layer_norm=layer_norm), (64,), 8).network
    obs = jnp.zeros((64,))
    ref = net.init(jax.random.PRNGKey(0), obs)
    fast, other = (lecun_normal_init(net, jax.random.PRNGKey(k), obs) for k in (0, 1))
    assert jax.tree.structure(ref) == jax.tree.structure(fast)
    for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(fast),
                               jax.tree.leaves(other)):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if path[-1].key != "kernel":
            np.testing.assert_array_equal(a, b)
            continue
        fan_in = a.shape[0]
        np.testing.assert_allclose(np.std(b), fan_in ** -0.5, rtol=0.05, err_msg=str(path))
        np.testing.assert_allclose(np.std(b), np.std(a), rtol=0.05, err_msg=str(path))
        assert np.max(np.abs(b)) <= 2.0 * fan_in ** -0.5 / 0.87962566103423978 + 1e-6
        assert abs(float(np.mean(b))) < 0.1 * fan_in ** -0.5
        assert not np.array_equal(b, c)


def test_double_q_selector_gets_no_gradient(setup):
    cfg, agent, state, target, batch = setup
    # Double Q with a target network: s' enters through the target (value) and the online
    # selector. With the target detached, neither path carries gradient.
    g = _grads(agent, state.params, target, batch, hp_with(cfg, double_q=True, stop_gradient_target=True))
    assert _norm(g[2]) == 0.0


def test_every_switch_combination_runs_from_one_compile(setup):
    cfg, agent, state, target, batch = setup
    traces = []

    @jax.jit
    def update(state, batch, hp):
        traces.append(1)
        return agent.update(state, batch, hp, jnp.asarray(True))

    for sg, tn, dq in itertools.product([True, False], repeat=3):
        new_state, metrics = update(state, batch, hp_with(cfg, stop_gradient_target=sg, target_network=tn, double_q=dq))
        assert np.isfinite(float(metrics["loss"]))
        assert _norm(jax.tree.map(lambda a, b: a - b, new_state.params, state.params)) > 0
    assert len(traces) == 1


def test_target_sync_hard_and_polyak(setup):
    from rlstop.agents.dqn import sync_due

    cfg, agent, state, target, batch = setup
    st = state.replace(target_params=target)
    # A sync is due when a multiple of target_update_period lies in (before, after].
    assert bool(sync_due(490, 500, 500)) and not bool(sync_due(489, 499, 500)) and not bool(sync_due(500, 510, 500))
    # Sync with tau = 1: hard copy.
    new, _ = agent.update(st, batch, hp_with(cfg, target_tau=1.0), jnp.asarray(True))
    for a, b in zip(jax.tree.leaves(new.target_params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    # Polyak with tau = 0.25: target <- 0.25 online + 0.75 target.
    new, _ = agent.update(st, batch, hp_with(cfg, target_tau=0.25), jnp.asarray(True))
    for t_new, t_old, p in zip(*(jax.tree.leaves(x) for x in (new.target_params, target, new.params))):
        np.testing.assert_allclose(t_new, 0.25 * p + 0.75 * t_old, rtol=1e-6, atol=1e-7)
    # No sync: the target stays, bit for bit.
    new, _ = agent.update(st, batch, hp_with(cfg), jnp.asarray(False))
    for a, b in zip(jax.tree.leaves(new.target_params), jax.tree.leaves(target)):
        np.testing.assert_array_equal(a, b)


def test_epsilon_greedy_explores_uniformly(setup):
    cfg, agent, state, _, _ = setup
    obs = jnp.zeros((20000, OBS))
    greedy = int(jnp.argmax(agent.network.apply(state.params, obs[:1]), -1)[0])
    acts = np.asarray(agent.act(state.params, obs, jax.random.PRNGKey(1), 0.5))
    # P(greedy) = 1 - eps + eps / A = 0.75, P(other) = 0.25.
    np.testing.assert_allclose(np.mean(acts == greedy), 0.75, atol=0.015)
    assert np.all(np.asarray(agent.act(state.params, obs[:100], jax.random.PRNGKey(2), 0.0)) == greedy)


def test_epsilon_schedule(setup):
    cfg, agent, *_ = setup
    hp = hparams(cfg)  # 1.0 -> 0.05 over half of the run
    eps = [float(agent.epsilon(jnp.asarray(s), hp, 1000)) for s in (0, 250, 500, 900)]
    np.testing.assert_allclose(eps, [1.0, 0.525, 0.05, 0.05], rtol=1e-6)


def test_replay_buffer_wraps_and_samples():
    example = Transition(jnp.zeros(2), jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros((), bool), jnp.zeros(2))
    for n in (2, 3):  # 2 divides the capacity (contiguous write), 3 does not (scatter)
        buf = replay.init(example, 4)
        for i in range(3):  # 3 batches of n transitions > capacity 4 -> wraps
            x = jnp.full((n, 2), float(i))
            buf = replay.add(buf, Transition(x, jnp.full(n, i), jnp.full(n, i, jnp.float32),
                                             jnp.zeros(n, bool), x), i * n)
        expected = [2, 2, 1, 1] if n == 2 else [2, 1, 2, 2]
        np.testing.assert_array_equal(buf.data.action, expected)
    # Only the filled slots are sampled.
    buf = replay.init(example, 4)
    buf = replay.add(buf, Transition(jnp.ones((2, 2)), jnp.array([7, 7]), jnp.ones(2), jnp.zeros(2, bool),
                                     jnp.ones((2, 2))), 0)
    s = replay.sample(buf, jax.random.PRNGKey(0), 64, 2)
    assert set(np.asarray(s.action).tolist()) == {7}


def test_two_seeds_have_different_initial_parameters():
    from rlstop.train import driver

    cfg = config_lib.load_config("configs/dqn_cartpole.yaml", ["train.seeds=2", "agent.hidden_sizes=[8]"])
    agent = DQN(cfg.agent, (4,), 2)
    keys = driver.batch_keys([cfg])
    hp, axes = driver.batch_hparams([cfg])
    assert all(a is None for a in axes.values())  # one config: every traced value is shared
    states = jax.vmap(agent.init, in_axes=(0, None))(keys, hp)
    k0 = states.params["params"]["torso"]["Dense_0"]["kernel"]
    assert not np.allclose(k0[0], k0[1])


@pytest.mark.parametrize("m", [6, 2, 1])  # wider than the input (x^T copied), narrower (g^T copied)
@pytest.mark.parametrize("x_shape", [(5,), (7, 4), (3, 7, 4)])
def test_dense_matmul_gradients_equal_autodiffs_of_x_at_w(x_shape, m):
    """networks.matmul (every Dense layer's product): the values and both gradients of x @ w,
    plain and vmapped, for a torso-like (m >= n) and a head-like (m < n) kernel."""
    from rlstop.networks import matmul

    kx, kw, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    n = x_shape[-1] if len(x_shape) > 1 else 5
    x = jax.random.normal(kx, x_shape if len(x_shape) > 1 else (n,))
    w = jax.random.normal(kw, (n, m))
    g = jax.random.normal(kg, x.shape[:-1] + (m,))
    ours = jax.vjp(matmul, x, w)
    ref = jax.vjp(lambda a, b: a @ b, x, w)
    np.testing.assert_array_equal(ours[0], ref[0])
    for a, b in zip(ours[1](g), ref[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if x.ndim > 1:  # rows of a batch, each with its own kernel
        ws = jnp.stack([w, 2 * w, -w][: x.shape[0]] + [w] * max(0, x.shape[0] - 3))
        f = lambda xs, ws: jnp.sum(jax.vmap(matmul)(xs, ws) * g)  # noqa: E731
        r = lambda xs, ws: jnp.sum(jax.vmap(jnp.matmul)(xs, ws) * g)  # noqa: E731
        for a, b in zip(jax.grad(f, (0, 1))(x, ws), jax.grad(r, (0, 1))(x, ws)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["configs/dqn_cartpole.yaml", "configs/ppo_pendulum.yaml"])
def test_init_compiled_with_the_older_cpu_emitters_gives_the_same_state(path):
    """The driver compiles the init function with init_options (the older emitters, LLVM code in
    one piece: faster to compile, and on one thread): the state must be the one the default
    options give, bit for bit."""
    from rlstop.envs import make_env
    from rlstop.train import driver

    options = driver.init_options(jax.default_backend())
    if options is None:
        pytest.skip("no init compiler options on this backend")
    cfg = config_lib.load_config(path, ["train.seeds=2"])
    env = make_env(cfg.env)
    hp, axes = driver.batch_hparams([cfg])
    program = driver.make_program(cfg, env, driver.varying_keys(axes))
    keys = driver.batch_keys([cfg])
    lowered = jax.jit(driver.batched(program.init, 2, (0, axes))).lower(keys, hp)
    ours = lowered.compile(options)(keys, hp)
    default = lowered.compile()(keys, hp)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(default)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluation_compiled_apart_scores_the_parameters_at_each_periods_end():
    """The driver evaluates after each chunk, with a function of its own compiled in a second
    thread: the last eval_return must be the greedy return of the final parameters, with the
    key the loop derives from the final state."""
    from rlstop.envs import make_env
    from rlstop.train import driver
    from tests.conftest import TINY_DQN

    cfg = config_lib.load_config("configs/dqn_cartpole.yaml", TINY_DQN + ["train.seeds=2", "train.eval_every=1000"])
    res = driver.run_group([cfg])
    assert res.eval_compile_s > 0
    env = make_env(cfg.env)
    hp, axes = driver.batch_hparams([cfg])
    program = driver.make_program(cfg, env, driver.varying_keys(axes))
    runner = res.runner
    keys = jax.vmap(driver.eval_key)(runner.key)
    direct = jax.jit(jax.vmap(program.evaluate, in_axes=(0, 0, axes)))(runner.agent.params, keys, hp)
    df = res.metrics[0]
    last = df[df.env_steps == df.env_steps.max()].sort_values("seed")
    assert df["eval_return"].notna().sum() == 2 * 2  # two periods, two seeds
    np.testing.assert_allclose(last["eval_return"].to_numpy(), np.asarray(direct), rtol=1e-6)
