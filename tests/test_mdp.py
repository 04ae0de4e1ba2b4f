"""Tests for rlstop.envs.mdp: Baird's counterexample, the two-state example, user MDPs."""

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlstop.envs import mdp as mdp_lib
from rlstop.errors import UserError

ALPHA = 0.01

# One jitted sampler for all tests: a batch of keys, a batch of states.
batched_step = jax.jit(jax.vmap(mdp_lib.step, in_axes=(None, 0, 0)))


# --------------------------------------------------------------------------------------------
# Baird's counterexample (S&B 2nd ed., Figure 11.2)
# --------------------------------------------------------------------------------------------


def test_baird_is_exactly_the_book():
    m = mdp_lib.baird()
    expected_features = np.array(
        [
            [2, 0, 0, 0, 0, 0, 0, 1],
            [0, 2, 0, 0, 0, 0, 0, 1],
            [0, 0, 2, 0, 0, 0, 0, 1],
            [0, 0, 0, 2, 0, 0, 0, 1],
            [0, 0, 0, 0, 2, 0, 0, 1],
            [0, 0, 0, 0, 0, 2, 0, 1],
            [0, 0, 0, 0, 0, 0, 1, 2],
        ],
        dtype=float,
    )
    np.testing.assert_array_equal(m.features, expected_features)
    np.testing.assert_array_equal(m.initial_weights, [1, 1, 1, 1, 1, 1, 10, 1])
    np.testing.assert_array_equal(m.behavior_policy, np.tile([6 / 7, 1 / 7], (7, 1)))
    np.testing.assert_array_equal(m.target_policy, np.tile([0.0, 1.0], (7, 1)))
    assert m.gamma == 0.99
    assert (m.num_states, m.num_actions, m.num_features) == (7, 2, 8)
    assert m.name == "baird"
    np.testing.assert_array_equal(m.rewards, 0.0)
    assert not m.terminal.any()
    np.testing.assert_allclose(m.start, np.full(7, 1 / 7))
    for s in range(7):  # dashed: uniform over the six upper states; solid: the lower state
        np.testing.assert_allclose(m.transitions[s, mdp_lib.BAIRD_DASHED], [1 / 6] * 6 + [0])
        np.testing.assert_array_equal(m.transitions[s, mdp_lib.BAIRD_SOLID], [0] * 6 + [1])


def test_baird_importance_ratios_are_7_on_solid_and_0_on_dashed():
    m = mdp_lib.baird()
    rho = mdp_lib.importance_ratios(m)
    np.testing.assert_allclose(rho[:, mdp_lib.BAIRD_SOLID], 7.0, rtol=1e-14)
    np.testing.assert_array_equal(rho[:, mdp_lib.BAIRD_DASHED], 0.0)
    # The sampler reports the same ratios.
    keys = jax.random.split(jax.random.key(0), 500)
    states = jnp.arange(500, dtype=jnp.int32) % 7
    tr = batched_step(m, keys, states)
    solid = np.asarray(tr.action) == mdp_lib.BAIRD_SOLID
    assert 0 < solid.sum() < 500
    np.testing.assert_allclose(np.asarray(tr.rho)[solid], 7.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(tr.rho)[~solid], 0.0)
    np.testing.assert_array_equal(np.asarray(tr.next_state)[solid], 6)
    assert (np.asarray(tr.next_state)[~solid] < 6).all()


def test_baird_behavior_distribution_is_uniform():
    m = mdp_lib.baird()
    mu = mdp_lib.behavior_state_distribution(m)
    np.testing.assert_allclose(mu, np.full(7, 1 / 7), atol=1e-14)


def test_baird_true_values_are_zero_and_td_fixed_point_gives_zero_values():
    m = mdp_lib.baird()
    np.testing.assert_array_equal(mdp_lib.true_values(m), 0.0)
    w = mdp_lib.td_fixed_point(m)
    np.testing.assert_allclose(m.features @ w, 0.0, atol=1e-12)


def test_baird_expected_semi_gradient_td_diverges():
    """A has an eigenvalue with negative real part, so I - alpha A has spectral radius > 1.

    For an eigenvalue lambda of A, |1 - alpha lambda|^2 = 1 - 2 alpha Re(lambda) + alpha^2
    |lambda|^2 > 1 for every alpha > 0 whenever Re(lambda) < 0: the expected update
    w <- (I - alpha A) w + alpha b then grows without bound along that eigenvector (here b = 0),
    for every positive step size -- S&B's claim about Baird's example.
    """
    m = mdp_lib.baird()
    a, b = mdp_lib.expected_td_matrix(m)
    np.testing.assert_array_equal(b, 0.0)
    eigenvalues = np.linalg.eigvals(a)
    assert eigenvalues.real.min() < -0.2  # about -0.239 and -0.022
    for alpha in (1e-4, 1e-2, 1e-1):
        radius = np.abs(np.linalg.eigvals(np.eye(8) - alpha * a)).max()
        assert radius > 1.0
    # And from the book's initial weights the DP iteration does blow up.
    w = np.array(m.initial_weights)
    for _ in range(1000):
        w = w + ALPHA * (b - a @ w)
    assert np.linalg.norm(w) > 10 * np.linalg.norm(m.initial_weights)


def test_baird_one_expected_update_equals_the_dp_formula():
    m = mdp_lib.baird()
    a, b = mdp_lib.expected_td_matrix(m)
    w0 = np.array([1.0, 1, 1, 1, 1, 1, 10, 1])
    w1 = w0 + ALPHA * (b - a @ w0)
    # By hand: x(s).w0 = 3 for the upper states, x(7).w0 = 12; gamma x(7).w0 = 11.88.
    # TD errors 8.88 (upper, times 2 e_i + e_8) and -0.12 (lower, times e_7 + 2 e_8).
    step = np.array([17.76] * 6 + [-0.12, 6 * 8.88 - 2 * 0.12])
    np.testing.assert_allclose(w1, w0 + ALPHA / 7 * step, rtol=1e-13)
    # And SCIENCE.md's formula, w + (alpha/7) sum_s (gamma x(7).w - x(s).w) x(s), literally.
    x, gamma = m.features, m.gamma
    for w in (w0, np.random.default_rng(0).normal(size=8)):
        dp = w + ALPHA / 7 * sum((gamma * x[6] @ w - x[s] @ w) * x[s] for s in range(7))
        np.testing.assert_allclose(w + ALPHA * (b - a @ w), dp, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# The two-state example (S&B 2nd ed., section 11.2 opening)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.3, 0.9])
def test_two_state_one_td_update_multiplies_w(gamma):
    m = mdp_lib.two_state(gamma)
    np.testing.assert_array_equal(m.features, [[1.0], [2.0]])
    np.testing.assert_array_equal(m.initial_weights, [1.0])
    s0 = jax.jit(mdp_lib.reset)(m, jax.random.key(1))
    tr = jax.jit(mdp_lib.step)(m, jax.random.key(2), s0)
    assert (int(tr.state), int(tr.next_state), float(tr.reward)) == (0, 1, 0.0)
    assert not bool(tr.terminated) and float(tr.rho) == 1.0
    x = m.features[:, 0]
    w, alpha = 1.7, 0.1
    delta = float(tr.reward) + gamma * x[int(tr.next_state)] * w - x[int(tr.state)] * w
    w_new = w + alpha * float(tr.rho) * delta * x[int(tr.state)]
    assert w_new == pytest.approx((1 + alpha * (2 * gamma - 1)) * w, rel=1e-14)
    # The transition out of s2 never updates w (rho = 0), so only s1 -> s2 moves it.
    back = jax.jit(mdp_lib.step)(m, jax.random.key(3), tr.continue_state)
    assert (int(back.state), int(back.next_state), float(back.rho)) == (1, 0, 0.0)


def test_two_state_expected_update_diverges_above_one_half():
    for gamma, sign in ((0.4, 1.0), (0.9, -1.0)):
        m = mdp_lib.two_state(gamma)
        a, b = mdp_lib.expected_td_matrix(m)
        np.testing.assert_allclose(a, [[(1 - 2 * gamma) / 2]], rtol=1e-14)
        np.testing.assert_array_equal(b, [0.0])
        assert np.sign(a[0, 0]) == sign
        np.testing.assert_allclose(mdp_lib.behavior_state_distribution(m), [0.5, 0.5])
        np.testing.assert_array_equal(mdp_lib.true_values(m), [0.0, 0.0])


# --------------------------------------------------------------------------------------------
# User MDPs
# --------------------------------------------------------------------------------------------


def random_walk_dict():
    """The 3-state random walk: 0 <-> 1 <-> 2, both ends into terminal state 3.

    Actions left (0) / right (1), 50/50; reward 1 only for stepping right out of state 2;
    gamma = 1; one-hot features (the terminal state's are 0); episodes start in state 1.
    """
    left, right = 0, 1
    p = np.zeros((4, 2, 4))
    p[0, left, 3] = p[0, right, 1] = 1
    p[1, left, 0] = p[1, right, 2] = 1
    p[2, left, 1] = p[2, right, 3] = 1
    p[3, :, 3] = 1  # unused: terminal
    rewards = np.zeros((4, 2))
    rewards[2, right] = 1.0
    return {
        "gamma": 1,
        "transitions": p.tolist(),
        "rewards": rewards.tolist(),
        "terminal": [False, False, False, True],
        "start": [0, 1, 0, 0],
        "features": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]],
        "behavior_policy": [[0.5, 0.5]] * 4,
    }


def test_tabular_on_policy_td_fixed_point_is_v_pi():
    m = mdp_lib.from_dict(random_walk_dict())
    np.testing.assert_array_equal(m.target_policy, m.behavior_policy)  # on-policy default
    np.testing.assert_array_equal(m.initial_weights, [0.0, 0.0, 0.0])
    # By hand: v(s) = Pr(leave on the right) = (s + 1) / 4; v(terminal) = 0.
    v = np.array([0.25, 0.5, 0.75, 0.0])
    np.testing.assert_allclose(mdp_lib.true_values(m), v, atol=1e-14)
    # Expected visits per episode from state 1: eta = (1, 2, 1, 0) -> mu = (1/4, 1/2, 1/4, 0).
    np.testing.assert_allclose(
        mdp_lib.behavior_state_distribution(m), [0.25, 0.5, 0.25, 0.0], atol=1e-14
    )
    np.testing.assert_allclose(mdp_lib.td_fixed_point(m), v[:3], atol=1e-13)


def test_discounted_cycle_closed_form():
    # 0 -> 1 -> 2 -> 0 with rewards 1, 2, 3 and gamma 1/2: v = (22, 30, 32) / 7.
    d = {
        "gamma": 0.5,
        "transitions": [[[0, 1, 0]], [[0, 0, 1]], [[1, 0, 0]]],
        "rewards": [[1], [2], [3]],
        "start": [1, 0, 0],
        "features": np.eye(3).tolist(),
        "behavior_policy": [[1], [1], [1]],
    }
    m = mdp_lib.from_dict(d)
    v = np.array([22, 30, 32]) / 7
    np.testing.assert_allclose(mdp_lib.true_values(m), v, rtol=1e-14)
    np.testing.assert_allclose(mdp_lib.behavior_state_distribution(m), [1 / 3] * 3, rtol=1e-12)
    np.testing.assert_allclose(mdp_lib.td_fixed_point(m), v, rtol=1e-12)


def test_make_mdp_dispatch():
    assert mdp_lib.make_mdp("baird", None).name == "baird"
    assert mdp_lib.make_mdp("two_state", {"gamma": 0.7}).gamma == 0.7
    assert mdp_lib.make_mdp("finite_mdp", random_walk_dict()).num_states == 4
    with pytest.raises(UserError, match="did you mean 'baird'"):
        mdp_lib.make_mdp("bard", None)
    with pytest.raises(UserError, match="env.mdp"):
        mdp_lib.make_mdp("finite_mdp", None)
    with pytest.raises(UserError, match="only 'gamma'"):
        mdp_lib.make_mdp("baird", {"features": [[1]]})


def test_from_dict_accepts_omegaconf_and_renormalises():
    from omegaconf import OmegaConf

    d = random_walk_dict()
    d["behavior_policy"] = [[0.3333333, 0.6666667]] * 4
    m = mdp_lib.from_dict(OmegaConf.create(d))
    np.testing.assert_allclose(m.behavior_policy.sum(axis=1), 1.0, rtol=0, atol=1e-15)


def _broken(path, value):
    d = copy.deepcopy(random_walk_dict())
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


_DELETE = object()

BAD_DICTS = {
    "row sum": (
        _broken(("transitions", 2, 1), [0.0, 0.5, 0.0, 0.4]),
        "env.mdp.transitions[2][1] sums to 0.9, must sum to 1",
    ),
    "negative prob": (
        _broken(("behavior_policy", 1), [-0.5, 1.5]),
        "env.mdp.behavior_policy[1][0] is -0.5, probabilities must be >= 0",
    ),
    "feature rows": (
        _broken(("features",), [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
        "env.mdp.features has 3 rows, expected one per state (4)",
    ),
    "reward cols": (
        _broken(("rewards", 0), [0.0]),
        "env.mdp.rewards[1] has 2 entries but env.mdp.rewards[0] has 1",
    ),
    "policy shape": (
        _broken(("target_policy",), [[1.0]] * 4),
        "env.mdp.target_policy[0] has 1 entries, expected one per action (2)",
    ),
    "next states": (
        _broken(("transitions",), np.full((4, 2, 3), 1 / 3).tolist()),
        "env.mdp.transitions[0][0] has 3 next-state probabilities, expected one per state (4)",
    ),
    "unknown key": (
        _broken(("transition",), [[[1]]]),
        "env.mdp has unknown key 'transition' (did you mean 'transitions'?); valid keys: gamma,",
    ),
    "missing key": (
        _broken(("features",), _DELETE),
        "env.mdp is missing required key 'features'",
    ),
    "gamma range": (_broken(("gamma",), 1.5), "env.mdp.gamma is 1.5, must be in [0, 1]"),
    "gamma type": (_broken(("gamma",), "0.9"), "env.mdp.gamma is '0.9', must be a number"),
    "non-number": (
        _broken(("rewards", 1, 0), "one"),
        "env.mdp.rewards[1][0] is 'one', expected a number",
    ),
    "start on terminal": (
        _broken(("start",), [0, 0.5, 0, 0.5]),
        "env.mdp.start[3] is 0.5 but state 3 is terminal",
    ),
    "start sum": (_broken(("start",), [0, 0.5, 0, 0]), "env.mdp.start sums to 0.5, must sum to 1"),
    "terminal entry": (
        _broken(("terminal", 2), "yes"),
        "env.mdp.terminal[2] is 'yes', expected true or false",
    ),
    "coverage": (
        _broken(("target_policy",), [[0.5, 0.5]] * 4)
        | {"behavior_policy": [[1.0, 0.0]] + [[0.5, 0.5]] * 3},
        "env.mdp.target_policy[0][1] is 0.5 but behavior_policy[0][1] is 0",
    ),
    "weights": (
        _broken(("initial_weights",), [1.0, 2.0]),
        "env.mdp.initial_weights has 2 entries, expected one per feature (3)",
    ),
    "nan": (
        _broken(("rewards", 0, 1), float("nan")),
        "env.mdp.rewards[0][1] is nan, must be finite",
    ),
    "gamma 1 never terminates": (
        _broken(("target_policy",), [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]),
        "env.mdp.gamma is 1 but under target_policy state 0 never reaches a terminal state",
    ),
    "gamma 1 continuing": (
        _broken(("terminal",), [False] * 4),
        "env.mdp.gamma is 1 but there are no terminal states, so v_pi is undefined",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DICTS))
def test_malformed_dicts_raise_one_line_user_errors(case):
    d, expected = BAD_DICTS[case]
    with pytest.raises(UserError) as info:
        mdp_lib.from_dict(d)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_random_walk_dict_itself_is_valid():
    # Guards the cases above: each is the valid dict with exactly one thing broken.
    mdp_lib.from_dict(random_walk_dict())


def test_continuing_mdp_with_gamma_below_one_is_accepted():
    d = random_walk_dict()
    d["terminal"] = [False] * 4
    d["start"] = [0.25] * 4
    d["gamma"] = 0.9
    m = mdp_lib.from_dict(d)
    assert not m.terminal.any()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sampled_frequencies_match_p_and_b():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=(3, 2))
    b = rng.dirichlet(np.ones(2), size=3)
    m = mdp_lib.from_dict(
        {
            "gamma": 0.9,
            "transitions": p.tolist(),
            "rewards": [[0, 1], [2, 3], [4, 5]],
            "start": [0.2, 0.3, 0.5],
            "features": np.eye(3).tolist(),
            "behavior_policy": b.tolist(),
            "target_policy": [[0.5, 0.5]] * 3,
        }
    )
    n = 8000
    keys = jax.random.split(jax.random.key(42), n)
    starts = np.asarray(jax.jit(jax.vmap(mdp_lib.reset, in_axes=(None, 0)))(m, keys))
    np.testing.assert_allclose(np.bincount(starts, minlength=3) / n, m.start, atol=0.03)
    for s in range(3):
        tr = jax.tree.map(np.asarray, batched_step(m, keys, jnp.full(n, s)))
        np.testing.assert_array_equal(tr.state, s)
        np.testing.assert_allclose(np.bincount(tr.action, minlength=2) / n, b[s], atol=0.03)
        for a in range(2):
            taken = tr.action == a
            freq = np.bincount(tr.next_state[taken], minlength=3) / taken.sum()
            np.testing.assert_allclose(freq, p[s, a], atol=0.05)
            np.testing.assert_allclose(tr.reward[taken], m.rewards[s, a])
            np.testing.assert_allclose(tr.rho[taken], 0.5 / b[s, a], rtol=1e-5)
        np.testing.assert_array_equal(tr.continue_state, tr.next_state)  # no terminal states


def test_entering_a_terminal_state_restarts_from_start():
    m = mdp_lib.from_dict(random_walk_dict())
    keys = jax.random.split(jax.random.key(0), 2000)
    tr = jax.tree.map(np.asarray, batched_step(m, keys, jnp.full(2000, 2)))
    right = tr.action == 1
    assert 0 < right.sum() < 2000
    np.testing.assert_array_equal(tr.next_state[right], 3)  # the true next state is terminal
    np.testing.assert_array_equal(tr.terminated, right)
    np.testing.assert_array_equal(tr.reward, right.astype(float))
    np.testing.assert_array_equal(tr.continue_state[right], 1)  # start = state 1
    np.testing.assert_array_equal(tr.continue_state[~right], 1)  # left from 2 is state 1 too


def test_step_compiles_once_and_runs_in_a_scan():
    m = mdp_lib.baird()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def rollout(mdp, key):
        def body(s, key):
            tr = mdp_lib.step(mdp, key, s)
            return tr.continue_state, tr.action

        s0 = mdp_lib.reset(mdp, key)
        return jax.lax.scan(body, s0, jax.random.split(key, 7000))[1]

    actions = rollout(m, jax.random.key(0))
    rollout(m.replace(gamma=0.5), jax.random.key(1))  # a new value, not a new trace
    assert abs(float(jnp.mean(actions == mdp_lib.BAIRD_SOLID)) - 1 / 7) < 0.02
