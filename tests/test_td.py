"""Linear TD prediction: hand-computed updates on Baird's example, the two-state factor, a tabular
fixed point, the gradient through the target per switch, one compile for every switch, and the
divergence / non-divergence of semi-gradient / residual-gradient TD end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlstop import cli
from rlstop import config as config_lib
from rlstop.agents import td as td_lib
from rlstop.envs import mdp as mdp_lib
from rlstop.errors import UserError
from rlstop.train import driver
from rlstop.train import mdp as loop

SOLID, DASHED = mdp_lib.BAIRD_SOLID, mdp_lib.BAIRD_DASHED
W0 = np.array([1.0, 1, 1, 1, 1, 1, 10, 1])  # the book's initial weights


@pytest.fixture(scope="module", autouse=True)
def restore_x64():
    """The driver turns x64 on globally for train.x64 runs; leave the flag as we found it."""
    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)


def load(path, *overrides):
    return config_lib.load_config(path, list(overrides))


def hp_with(cfg, **switches):
    hp = td_lib.hparams(cfg.agent)
    hp.update({k: jnp.asarray(v, hp[k].dtype) for k, v in switches.items()})  # same dtypes: no retrace
    return hp


# One jitted update per static variant (sampled / expected), shared by every test; x64 so the
# hand-computed numbers match to ~1e-15.
_UPDATES = {}


def baird_update(update: str):
    if update not in _UPDATES:
        cfg = load("configs/baird.yaml", f"agent.update={update}")
        with jax.enable_x64(True):
            agent = td_lib.TD(cfg.agent, mdp_lib.baird())
        _UPDATES[update] = (cfg, agent, jax.jit(agent.update))
    return _UPDATES[update]


def baird_transition(s: int, action: int) -> mdp_lib.Transition:
    """A batch of one Baird transition: solid goes to the lower state (index 6), rho = 7;
    dashed goes to an upper state (say index 0), rho = 0. All rewards are 0."""
    s_next = 6 if action == SOLID else 0
    one = lambda v, dt: jnp.asarray([v], dt)  # noqa: E731
    with jax.enable_x64(True):
        return mdp_lib.Transition(
            state=one(s, jnp.int32), action=one(action, jnp.int32), reward=one(0.0, jnp.float64),
            next_state=one(s_next, jnp.int32), terminated=one(False, jnp.bool_),
            rho=one(7.0 if action == SOLID else 0.0, jnp.float64), continue_state=one(s_next, jnp.int32))


def one_update(update, batch=None, **switches):
    with jax.enable_x64(True):
        cfg, agent, step = baird_update(update)
        state, metrics = step(agent.init(), batch, hp_with(cfg, **switches))
        assert state.w.dtype == jnp.float64
        return np.asarray(state.w), float(metrics["loss"])


# ---------------------------------------------------------------------------------------------
# Baird's example from the book's weights w = (1, 1, 1, 1, 1, 1, 10, 1), alpha 0.01, gamma 0.99:
# v(upper) = 2 * 1 + 1 = 3, v(lower) = 10 + 2 * 1 = 12.
# Upper state, solid: delta = 0.99 * 12 - 3 = 8.88.   Lower state, solid: delta = 0.99 * 12 - 12 = -0.12.


def test_semi_gradient_sampled_update():
    # w += alpha rho delta x(s) = 0.01 * 7 * 8.88 * (2 e1 + e8) = 0.6216 * (2 e1 + e8)
    w, loss = one_update("sampled", baird_transition(0, SOLID))
    np.testing.assert_allclose(w, [2.2432, 1, 1, 1, 1, 1, 10, 1.6216], rtol=1e-14)
    np.testing.assert_allclose(loss, 0.5 * 7 * 8.88**2, rtol=1e-14)  # 275.9904
    # Lower state: 0.01 * 7 * -0.12 * (e7 + 2 e8) = -0.0084 * (e7 + 2 e8)
    w, _ = one_update("sampled", baird_transition(6, SOLID))
    np.testing.assert_allclose(w, [1, 1, 1, 1, 1, 1, 9.9916, 0.9832], rtol=1e-14)
    # Dashed: rho = 0, no update at all.
    w, loss = one_update("sampled", baird_transition(3, DASHED))
    np.testing.assert_array_equal(w, W0)
    assert loss == 0.0


def test_residual_gradient_sampled_update():
    # w += alpha rho delta (x(s) - gamma x(7)); x(1) - 0.99 x(7) = 2 e1 - 0.99 e7 - 0.98 e8:
    # w1 = 1 + 0.6216 * 2 = 2.2432, w7 = 10 - 0.6216 * 0.99 = 9.384616, w8 = 1 - 0.6216 * 0.98 = 0.390832
    w, loss = one_update("sampled", baird_transition(0, SOLID), stop_gradient_target=False)
    np.testing.assert_allclose(w, [2.2432, 1, 1, 1, 1, 1, 9.384616, 0.390832], rtol=1e-14)
    np.testing.assert_allclose(loss, 275.9904, rtol=1e-14)  # the loss value is the same; its gradient is not
    # Lower state: x(7) - 0.99 x(7) = 0.01 e7 + 0.02 e8, times -0.0084
    w, _ = one_update("sampled", baird_transition(6, SOLID), stop_gradient_target=False)
    np.testing.assert_allclose(w, [1, 1, 1, 1, 1, 1, 9.999916, 0.999832], rtol=1e-14)


def test_semi_gradient_expected_update_is_the_books():
    # w += (alpha / 7) sum_s (gamma x(7).w - x(s).w) x(s)
    #   sum_s delta_s x(s) = 8.88 * (2 e_i + e8) for i = 1..6, plus -0.12 * (e7 + 2 e8)
    #                      = 17.76 e_i (each i) - 0.12 e7 + (53.28 - 0.24 = 53.04) e8
    w, loss = one_update("expected")
    np.testing.assert_allclose(w, [1 + 0.01 / 7 * 17.76] * 6 + [10 - 0.01 / 7 * 0.12, 1 + 0.01 / 7 * 53.04],
                               rtol=1e-14)
    np.testing.assert_allclose(w, [1.0253714285714286] * 6 + [9.999828571428571, 1.0757714285714286], rtol=1e-14)
    # loss = (1/7) sum_s delta_s^2 / 2 = (6 * 8.88^2 + 0.12^2) / 14
    np.testing.assert_allclose(loss, (6 * 8.88**2 + 0.12**2) / 14, rtol=1e-14)


def test_residual_gradient_expected_update():
    # w += (alpha / 7) sum_s delta_s (x(s) - gamma x(7))
    #   upper: 8.88 * (2 e_i - 0.99 e7 - 0.98 e8) -> e_i: 17.76, e7: -6 * 8.7912 = -52.7472, e8: -6 * 8.7024 = -52.2144
    #   lower: -0.12 * 0.01 (e7 + 2 e8)          -> e7: -0.0012, e8: -0.0024
    #   total: e_i 17.76, e7 -52.7484, e8 -52.2168
    w, _ = one_update("expected", stop_gradient_target=False)
    np.testing.assert_allclose(w, [1.0253714285714286] * 6 + [10 - 0.01 / 7 * 52.7484, 1 - 0.01 / 7 * 52.2168],
                               rtol=1e-14)
    np.testing.assert_allclose(w[6:], [9.924645142857143, 0.9254045714285714], rtol=1e-14)


@pytest.mark.parametrize("name", ["baird", "random_walk"])
def test_expected_semi_gradient_matches_expected_td_matrix(name):
    """Cross-check against the independent closed form w <- w + alpha (b - A w) (envs/mdp.py)."""
    cfg = load(f"configs/{name}.yaml", "agent.update=expected", "env.num_envs=1")
    with jax.enable_x64(True):
        env = mdp_lib.make_mdp(cfg.env.id, cfg.env.mdp)
        agent = td_lib.TD(cfg.agent, env)
        w = np.random.default_rng(0).normal(size=env.num_features)
        state = td_lib.TDState(jnp.asarray(w), jnp.asarray(w), jnp.zeros((), jnp.int32))
        new, _ = agent.update(state, None, td_lib.hparams(cfg.agent))
    a, b = mdp_lib.expected_td_matrix(env)
    np.testing.assert_allclose(new.w, w + cfg.agent.learning_rate * (b - a @ w), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Two-state example through the real loop: a block is 10 steps = 5 updates on s1 -> s2 (sampled,
# the s2 -> s1 step has rho = 0) or 10 expected updates. alpha 0.1, gamma 0.9, w0 = 1.


_PROGRAMS = {}


def program(path, *overrides):
    """Jitted (init, block) of a config's program, compiled once per static variant."""
    key = (path, overrides)
    if key not in _PROGRAMS:
        cfg = load(path, *overrides)
        with jax.enable_x64(cfg.train.x64):  # the program's constants take this dtype: call it under the same
            env = mdp_lib.make_mdp(cfg.env.id, cfg.env.mdp)
            prog = loop.make_program(cfg, env)
        traces = []

        def block(runner, hp):
            traces.append(1)  # runs once per trace, never per call
            return prog.block(runner, hp)

        _PROGRAMS[key] = (cfg, prog, prog.init, jax.jit(block), traces)  # init: a few ops, eager
    return _PROGRAMS[key]


def two_state_w(update, blocks=3, **switches):
    cfg, prog, init, block, traces = program("configs/two_state.yaml", f"agent.update={update}")
    with jax.enable_x64(True):
        hp = hp_with(cfg, **switches)
        runner = init(jax.random.PRNGKey(0), hp)
        ws = []
        for _ in range(blocks):
            runner, m = block(runner, hp)
            ws.append(float(m["w0"]))
    return np.array(ws)


def test_two_state_semi_gradient_factor_is_exact():
    alpha, gamma = 0.1, 0.9
    factor = 1 + alpha * (2 * gamma - 1)  # 1.08 per s1 -> s2 update
    np.testing.assert_allclose(two_state_w("sampled"), factor ** np.array([5, 10, 15]), rtol=1e-13)
    # Expected: mu = (1/2, 1/2), so half the factor's excess per update: 1 + 0.08 / 2 = 1.04.
    np.testing.assert_allclose(two_state_w("expected"), (1 + alpha * (2 * gamma - 1) / 2) ** np.array([10, 20, 30]),
                               rtol=1e-13)


def test_two_state_residual_gradient_shrinks():
    # w <- w + alpha (2 gamma w - w)(1 - 2 gamma) = (1 - alpha (2 gamma - 1)^2) w = 0.936 w
    ws = two_state_w("sampled", stop_gradient_target=False)
    np.testing.assert_allclose(ws, 0.936 ** np.array([5, 10, 15]), rtol=1e-13)
    ws = two_state_w("expected", stop_gradient_target=False)  # (1 - 0.064 / 2) = 0.968 per update
    np.testing.assert_allclose(ws, 0.968 ** np.array([10, 20, 30]), rtol=1e-13)
    assert np.all(np.diff(np.abs(ws)) < 0)


def test_target_network_freezes_the_bootstrap():
    # Two-state expected, target synced every 5 updates: loss = mu(s1) (2 gamma w_target - w)^2 / 2,
    # so w <- w + 0.1 * 0.5 * (1.8 w_target - w) = 0.95 w + 0.09 w_target.
    cfg, prog, init, block, traces = program("configs/two_state.yaml", "agent.update=expected")
    with jax.enable_x64(True):
        hp = hp_with(cfg, target_network=True, target_update_period=5)
        runner, m = block(init(jax.random.PRNGKey(0), hp), hp)  # one block = 10 updates
    w = target = 1.0
    for k in range(1, 11):
        w = 0.95 * w + 0.09 * target
        if k % 5 == 0:
            target = w
    np.testing.assert_allclose(float(m["w0"]), w, rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# Tabular TD converges to its fixed point, here v_pi = (1, 2, 3, 4, 5) / 6 of the random walk.


def test_random_walk_expected_converges_to_closed_form():
    cfg, prog, init, block, traces = program("configs/random_walk.yaml", "agent.update=expected", "env.num_envs=1",
                                     "train.log_every=2000", "train.x64=true")
    with jax.enable_x64(True):
        hp = hp_with(cfg, learning_rate=1.0)
        runner = init(jax.random.PRNGKey(0), hp)
        for _ in range(2):
            runner, m = block(runner, hp)
    values = [float(m[f"value_s{i}"]) for i in range(7)]
    np.testing.assert_allclose(values, [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 0], atol=1e-10)
    assert float(m["rmsve"]) < 1e-10


def test_random_walk_sampled_gets_close():
    cfg, prog, init, block, traces = program("configs/random_walk.yaml")  # 4 chains, alpha 0.05
    with jax.enable_x64(False):
        hp = td_lib.hparams(cfg.agent)
        runner = init(jax.random.PRNGKey(1), hp)
        rmsve = []
        for _ in range(20):  # 20 x 400 env steps = 2000 updates of 4 chains
            runner, m = block(runner, hp)
            rmsve.append(float(m["rmsve"]))
    assert rmsve[0] > 0.05 > max(rmsve[-5:]), rmsve


# ---------------------------------------------------------------------------------------------
# Switches: the gradient through the target, one compile for every combination.


def test_gradient_through_target_is_exactly_zero_when_detached():
    cfg, agent, _ = baird_update("sampled")
    m = mdp_lib.baird()
    with jax.enable_x64(True):
        batch = baird_transition(0, SOLID)
        w = jnp.asarray(W0)

        def loss(w_pred, w_boot, sg):
            delta = agent.td_errors(w_pred, w_boot, batch.state, batch.reward, batch.terminated, batch.next_state,
                                    hp_with(cfg, stop_gradient_target=sg))
            return jnp.sum(0.5 * batch.rho * delta**2)

        on = jax.grad(loss, argnums=(0, 1))(w, w, True)
        off = jax.grad(loss, argnums=(0, 1))(w, w, False)
        # The agent's loss (same weights on both sides): the sum of both parts when off, the first when on.
        full = {sg: jax.grad(lambda w_: agent.sampled_loss(w_, w_, batch, hp_with(cfg, stop_gradient_target=sg))[0])(w)
                for sg in (True, False)}
    assert np.all(np.asarray(on[1]) == 0.0)                      # detached: nothing through x(s')
    # not detached: d/dw_boot = rho delta gamma x(7) = 7 * 8.88 * 0.99 * (e7 + 2 e8)
    np.testing.assert_allclose(off[1], 7 * 8.88 * 0.99 * m.features[6], rtol=1e-14)
    np.testing.assert_array_equal(on[0], off[0])                 # the prediction side is unchanged
    np.testing.assert_allclose(on[0], -7 * 8.88 * m.features[0], rtol=1e-14)
    np.testing.assert_array_equal(full[True], on[0])
    np.testing.assert_allclose(full[False], off[0] + off[1], rtol=1e-14)


@pytest.mark.parametrize("sg", [True, False])
def test_target_weights_never_get_gradient(sg):
    cfg, agent, _ = baird_update("sampled")
    with jax.enable_x64(True):
        batch = baird_transition(0, SOLID)
        w = jnp.asarray(W0)
        hp = hp_with(cfg, stop_gradient_target=sg, target_network=True)
        g_online, g_target = jax.grad(lambda a, b: agent.sampled_loss(a, b, batch, hp)[0], argnums=(0, 1))(w, 2 * w)
        hp_semi = hp_with(cfg, stop_gradient_target=True, target_network=True)
        g_semi = jax.grad(lambda a: agent.sampled_loss(a, 2 * w, batch, hp_semi)[0])(w)
    assert np.all(np.asarray(g_target) == 0.0)
    # With a target network the online step is the semi-gradient one whatever the switch says.
    np.testing.assert_array_equal(g_online, g_semi)


@pytest.mark.parametrize("update", ["sampled", "expected"])
def test_one_compile_serves_every_switch_combination(update):
    cfg, prog, init, block, traces = program("configs/baird.yaml", f"agent.update={update}", "train.x64=false")
    with jax.enable_x64(False):
        runner = init(jax.random.PRNGKey(0), td_lib.hparams(cfg.agent))
        for sg in (True, False):
            for tn in (True, False):
                hp = hp_with(cfg, stop_gradient_target=sg, target_network=tn, learning_rate=0.005, l2=0.1)
                _, m = block(runner, hp)
                assert m["w_norm"].dtype == jnp.float32 and np.isfinite(float(m["w_norm"]))
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# End to end through the driver (one compile for the whole batch) and the CLI.


@pytest.fixture(scope="module")
def baird_group():
    """Semi-gradient and residual-gradient sampled TD on Baird, 2 seeds each, 3000 steps, x64:
    one vmapped batch of 4 (the switch is traced)."""
    semi = load("configs/baird.yaml", "train.total_steps=3000", "train.log_every=100", "train.seeds=2")
    resid = config_lib.replace(semi, {"agent.stop_gradient_target": False, "name": "residual"})
    assert config_lib.static_signature(semi) == config_lib.static_signature(resid)
    return driver.run_group([semi, resid])


def test_x64_run_gives_float64_weights(baird_group):
    for extras in baird_group.extras:
        assert extras["weights"].dtype == np.float64 and extras["weights"].shape == (2, 8)
        assert extras["values"].shape == (2, 7)


def test_seeds_follow_different_sample_paths(baird_group):
    for df in baird_group.metrics:
        a, b = (g.filter(like="value_s").to_numpy() for _, g in df.groupby("seed"))
        assert not np.allclose(a, b)


def test_baird_semi_gradient_diverges_residual_stays_bounded(baird_group):
    semi, resid = baird_group.metrics
    start = np.linalg.norm(W0)  # 10.34
    final_semi = semi[semi.env_steps == 3000].w_norm.to_numpy()
    assert np.all(final_semi > 10 * start), final_semi
    assert all(s is not None for s in baird_group.diverged_step[0])
    assert np.all(resid.w_norm.to_numpy() < 1.1 * start)
    assert np.all(resid.value_max_abs.to_numpy() < 100)  # the soft-divergence bound 1 / (1 - 0.99)
    assert all(s is None for s in baird_group.diverged_step[1])


def test_cli_records_a_nonfinite_run_as_diverged(tmp_path):
    # alpha 10 on the two-state example: w grows 9x per update and overflows to inf, then NaN.
    rc = cli.main(["train", "configs/two_state.yaml", "agent.learning_rate=10", "train.x64=false",
                   "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    with open(os.path.join(tmp_path, "two_state", "summary.json")) as f:
        s = json.load(f)
    assert s["status"] == "diverged" and all(s["diverged"]["nonfinite"])
    assert len(s["final"]["weights"]["per_seed"]) == 2 and len(s["final"]["values"]["mean"]) == 2


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError, match="disagrees with the MDP's gamma"):
        load("configs/baird.yaml", "agent.gamma=0.9")
    with pytest.raises(UserError, match="agent.update"):
        load("configs/baird.yaml", "agent.update=exact")
    with pytest.raises(UserError, match="needs a finite MDP"):
        load("configs/baird.yaml", "env.id=CartPole-v1", "env.backend=auto")
    assert load("configs/baird.yaml", "agent.gamma=0.99").agent.gamma == 0.99


def test_reward_bound_gives_soft_divergence_bound_100_on_baird():
    cfg = load("configs/baird.yaml")
    assert mdp_lib.baird().reward_bound == 1.0  # all rewards 0: floored at 1
    assert driver.value_bound(cfg, mdp_lib.baird()) == pytest.approx(100.0)
    walk = load("configs/random_walk.yaml")
    spec = dict(walk.env.mdp, rewards=[[0, 0]] * 5 + [[-5, 2], [0, 0]], gamma=0.9)
    assert mdp_lib.from_dict(spec).reward_bound == 5.0  # max |R|
