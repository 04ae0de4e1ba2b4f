"""Tests for rlstop.losses: hand-computed values, and a gradient test for every switch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlstop import losses

f32 = jnp.float32
ON_OFF = [True, False]


# How the flag reaches the loss: "python" closes over a Python bool; "traced" passes a jnp.bool_
# argument into `jax.jit`, so `_maybe_stop` sees a tracer; "vmapped" maps over the flags
# [flag, not flag] in one call (a batched tracer, as in a sweep over switches).
MODES = ["python", "traced", "vmapped"]


def _grad(loss, x, flag, mode):
    """Gradient of loss(x, flag) w.r.t. x, with the flag reaching the loss as `mode` says."""
    if mode == "python":
        return jax.grad(lambda x_: loss(x_, flag))(x)
    if mode == "traced":
        return jax.jit(jax.grad(loss))(x, jnp.bool_(flag))
    # A mixed batch of flags: row 0 must behave as `flag` alone would.
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(x, jnp.array([flag, not flag]))
    return grads[0]


def _check_switch(grad, flag):
    grad = np.asarray(grad)
    if flag:
        np.testing.assert_array_equal(grad, np.zeros_like(grad))
    else:
        assert np.any(grad != 0.0), grad


# ---------------------------------------------------------------------------------------------
# Q-learning, double Q-learning, TD(0).

Q_TM1 = jnp.array([1.0, 2.0, 3.0], f32)
A_TM1 = jnp.array(1, jnp.int32)
R_T = jnp.array(0.5, f32)
DISCOUNT_T = jnp.array(0.9, f32)
Q_T = jnp.array([4.0, 0.0, 2.0], f32)


@pytest.mark.parametrize("flag", ON_OFF)
def test_q_learning_value(flag):
    # target = 0.5 + 0.9 * max(4, 0, 2) = 0.5 + 3.6 = 4.1; td = 4.1 - q_tm1[1] = 4.1 - 2 = 2.1
    td = losses.q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, Q_T, stop_gradient=flag)
    np.testing.assert_allclose(td, 2.1, rtol=1e-6)


def test_q_learning_terminal():
    # discount 0 (terminated): target = r = 0.5; td = 0.5 - 2 = -1.5
    td = losses.q_learning(Q_TM1, A_TM1, R_T, jnp.array(0.0, f32), Q_T, stop_gradient=True)
    np.testing.assert_allclose(td, -1.5, rtol=1e-6)


def test_q_learning_vmap():
    td = jax.vmap(lambda *a: losses.q_learning(*a, stop_gradient=True))(
            jnp.stack([Q_TM1, Q_TM1]), jnp.array([1, 2]), jnp.array([0.5, 1.0], f32),
            jnp.array([0.9, 0.0], f32), jnp.stack([Q_T, Q_T]))
    # row 0 as above: 2.1; row 1: target = 1.0 + 0 = 1.0, td = 1.0 - q_tm1[2] = 1 - 3 = -2
    np.testing.assert_allclose(td, [2.1, -2.0], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", ON_OFF)
def test_q_learning_grad_to_q_tm1_always_flows(flag, mode):
    def loss(q_tm1, f):
        return 0.5 * losses.q_learning(q_tm1, A_TM1, R_T, DISCOUNT_T, Q_T, stop_gradient=f) ** 2
    # d(0.5 td^2)/dq_tm1[1] = -td = -2.1
    np.testing.assert_allclose(_grad(loss, Q_TM1, flag, mode), [0.0, -2.1, 0.0], rtol=1e-5)


Q_T_SELECTOR = jnp.array([0.0, 1.0, 5.0], f32)


@pytest.mark.parametrize("flag", ON_OFF)
def test_double_q_learning_value(flag):
    # a* = argmax([0, 1, 5]) = 2; target = 0.5 + 0.9 * q_t_value[2] = 0.5 + 0.9 * 2 = 2.3
    # td = 2.3 - q_tm1[1] = 2.3 - 2 = 0.3   (plain Q-learning would use max q_t = 4 -> 2.1)
    td = losses.double_q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, Q_T, Q_T_SELECTOR,
                                  stop_gradient=flag)
    np.testing.assert_allclose(td, 0.3, rtol=1e-5)


def test_double_q_learning_same_selector_is_q_learning():
    td_double = losses.double_q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, Q_T, Q_T,
                                         stop_gradient=True)
    td = losses.q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, Q_T, stop_gradient=True)
    np.testing.assert_allclose(td_double, td, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", ON_OFF)
def test_double_q_learning_selector_never_gets_gradient(flag, mode):
    def loss(q_t_selector, f):
        return losses.double_q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, Q_T, q_t_selector,
                                        stop_gradient=f) ** 2
    g = _grad(loss, Q_T_SELECTOR, flag, mode)
    np.testing.assert_array_equal(g, np.zeros(3, np.float32))


@pytest.mark.parametrize("flag", ON_OFF)
def test_td_learning_value(flag):
    # target = 1.0 + 0.5 * 4.0 = 3.0; td = 3.0 - 2.0 = 1.0
    td = losses.td_learning(f32(2.0), f32(1.0), f32(0.5), f32(4.0), stop_gradient=flag)
    np.testing.assert_allclose(td, 1.0, rtol=1e-6)


def test_td_learning_residual_gradient_same_state():
    # One value v feeds both v_tm1 and v_t (same state): r = 1, g = 0.5, v = 4:
    # td = 1 + 0.5*4 - 4 = -1.
    # off: d(0.5 td^2)/dv = td * (g - 1) = -1 * -0.5 = 0.5; on (semi-gradient): td * -1 = 1.
    def loss(v, f):
        return 0.5 * losses.td_learning(v, f32(1.0), f32(0.5), v, stop_gradient=f) ** 2
    np.testing.assert_allclose(jax.grad(loss)(f32(4.0), False), 0.5, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(f32(4.0), True), 1.0, rtol=1e-6)


def test_stop_gradient_is_keyword_only_without_default():
    with pytest.raises(TypeError):
        losses.td_learning(f32(2.0), f32(1.0), f32(0.5), f32(4.0))
    with pytest.raises(TypeError):
        losses.td_learning(f32(2.0), f32(1.0), f32(0.5), f32(4.0), True)


# ---------------------------------------------------------------------------------------------
# n-step returns.

R3 = jnp.array([1.0, 2.0, 3.0], f32)
D3 = jnp.array([0.5, 0.5, 0.5], f32)
V3 = jnp.array([10.0, 20.0, 30.0], f32)


@pytest.mark.parametrize(
    "n, discount, expected",
    [
        # n=1: G = r + d v_t = [1 + 5, 2 + 10, 3 + 15] = [6, 12, 18]
        (1, D3, [6.0, 12.0, 18.0]),
        # n=2: G_0 = 1 + .5*2 + .25*v_t[1] = 1 + 1 + 5 = 7
        #      G_1 = 2 + .5*3 + .25*v_t[2] = 2 + 1.5 + 7.5 = 11
        #      G_2 = 3 + .5*v_t[2] = 3 + 15 = 18          (truncated at the end)
        (2, D3, [7.0, 11.0, 18.0]),
        # n=5 > T: G_0 = 1 + .5*2 + .25*3 + .125*30 = 1 + 1 + .75 + 3.75 = 6.5
        #          G_1 = 2 + .5*3 + .25*30 = 11;  G_2 = 18
        (5, D3, [6.5, 11.0, 18.0]),
        # n=2 with a termination at step 1 (d_1 = 0):
        #   G_0 = 1 + .5*2 + .5*0*20 = 2;  G_1 = 2 + 0*3 = 2;  G_2 = 3 + .5*30 = 18
        (2, jnp.array([0.5, 0.0, 0.5], f32), [2.0, 2.0, 18.0]),
    ])
def test_n_step_bootstrapped_returns_value(n, discount, expected):
    g = losses.n_step_bootstrapped_returns(R3, discount, V3, n, stop_gradient=True)
    np.testing.assert_allclose(g, expected, rtol=1e-6)


def test_n_step_rejects_bad_n():
    with pytest.raises(ValueError):
        losses.n_step_bootstrapped_returns(R3, D3, V3, 0, stop_gradient=True)


# ---------------------------------------------------------------------------------------------
# lambda-returns and GAE on one sequence with a termination and a truncation inside it.
#
# gamma = 0.9, lambda = 0.5, T = 5.
#   step i        0    1    2    3    4
#   r_i           1    2    0    1    3
#   terminated    0    1    0    0    0     -> discount = [.9, 0, .9, .9, .9]
#   truncated     0    0    0    1    0     -> continue = [1, 0, 1, 0, 1]
#   v_t[i]        2    5    1    4    2     (value of the TRUE next obs; 5 and 4 are final obs)
#   v_tm1[i]      1    2    0    1    3     (v_tm1[i+1] == v_t[i] wherever continue_i = 1;
#                                           v_tm1[2] and v_tm1[4] are reset states)
#
# lambda-returns, G_5 := v_t[-1] = 2, G_i = r_i + d_i ((1 - l c_i) v_t[i] + l c_i G_{i+1}):
#   G_4 = 3 + .9 (.5*2 + .5*2)       = 3 + 1.8       = 4.8
#   G_3 = 1 + .9 (1*4 + 0)           = 1 + 3.6       = 4.6   (truncation: bootstrap v_t[3])
#   G_2 = 0 + .9 (.5*1 + .5*4.6)     = .9 * 2.8      = 2.52
#   G_1 = 2 + 0                      = 2                     (termination)
#   G_0 = 1 + .9 (.5*2 + .5*2)       = 1 + 1.8       = 2.8
#
# GAE, delta_i = r_i + d_i v_t[i] - v_tm1[i], A_i = delta_i + d_i l c_i A_{i+1}, A_5 := 0:
#   delta = [1 + 1.8 - 1, 2 + 0 - 2, 0 + .9 - 0, 1 + 3.6 - 1, 3 + 1.8 - 3] = [1.8, 0, .9, 3.6, 1.8]
#   A_4 = 1.8
#   A_3 = 3.6 + .9*.5*0*1.8          = 3.6    (a trace crossing the truncation would give 4.41)
#   A_2 = .9 + .9*.5*1*3.6           = .9 + 1.62 = 2.52
#   A_1 = 0 + 0*...                  = 0
#   A_0 = 1.8 + .45*0                = 1.8
#   check: G - v_tm1 = [2.8-1, 2-2, 2.52-0, 4.6-1, 4.8-3] = [1.8, 0, 2.52, 3.6, 1.8]  == A

SEQ_R = jnp.array([1.0, 2.0, 0.0, 1.0, 3.0], f32)
SEQ_D = jnp.array([0.9, 0.0, 0.9, 0.9, 0.9], f32)
SEQ_C = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0], f32)
SEQ_V_T = jnp.array([2.0, 5.0, 1.0, 4.0, 2.0], f32)
SEQ_V_TM1 = jnp.array([1.0, 2.0, 0.0, 1.0, 3.0], f32)
LAMBDA = 0.5
EXPECTED_G = [2.8, 2.0, 2.52, 4.6, 4.8]
EXPECTED_A = [1.8, 0.0, 2.52, 3.6, 1.8]


@pytest.mark.parametrize("flag", ON_OFF)
def test_lambda_returns_value(flag):
    g = losses.lambda_returns(SEQ_R, SEQ_D, SEQ_V_T, SEQ_C, LAMBDA, stop_gradient=flag)
    np.testing.assert_allclose(g, EXPECTED_G, rtol=1e-5)


@pytest.mark.parametrize("flag", ON_OFF)
def test_gae_value(flag):
    a = losses.generalized_advantage_estimation(SEQ_R, SEQ_D, SEQ_V_TM1, SEQ_V_T, SEQ_C, LAMBDA,
                                                stop_gradient=flag)
    np.testing.assert_allclose(a, EXPECTED_A, rtol=1e-5)


def test_gae_equals_lambda_returns_minus_values():
    for lam in [0.0, 0.5, 0.95, 1.0]:
        a = losses.generalized_advantage_estimation(SEQ_R, SEQ_D, SEQ_V_TM1, SEQ_V_T, SEQ_C, lam,
                                                    stop_gradient=True)
        g = losses.lambda_returns(SEQ_R, SEQ_D, SEQ_V_T, SEQ_C, lam, stop_gradient=True)
        np.testing.assert_allclose(a, g - SEQ_V_TM1, rtol=1e-5, atol=1e-6)


def test_gae_equals_lambda_returns_minus_values_random():
    # Random consistent sequences: v_tm1[i+1] = v_t[i] wherever the episode continues.
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
    t = 16
    r = jax.random.normal(k1, (t,))
    v_t = jax.random.normal(k2, (t,))
    cont = (jax.random.uniform(k3, (t,)) > 0.3).astype(f32)
    term = (jax.random.uniform(k4, (t,)) > 0.5).astype(f32) * (1.0 - cont)
    d = 0.99 * (1.0 - term)
    reset_v = jax.random.normal(k5, (t,))
    v_tm1 = jnp.concatenate([reset_v[:1], jnp.where(cont[:-1] > 0, v_t[:-1], reset_v[1:])])
    a = losses.generalized_advantage_estimation(r, d, v_tm1, v_t, cont, 0.9, stop_gradient=True)
    g = losses.lambda_returns(r, d, v_t, cont, 0.9, stop_gradient=True)
    np.testing.assert_allclose(a, g - v_tm1, rtol=1e-5, atol=1e-5)


def test_lambda_returns_limits():
    # lambda = 0: G = r + d v_t (one-step targets) = [1 + 1.8, 2, .9, 1 + 3.6, 3 + 1.8]
    g0 = losses.lambda_returns(SEQ_R, SEQ_D, SEQ_V_T, SEQ_C, 0.0, stop_gradient=True)
    np.testing.assert_allclose(g0, [2.8, 2.0, 0.9, 4.6, 4.8], rtol=1e-6)
    # lambda = 1 with no boundaries equals the n-step return with n = T.
    ones = jnp.ones(3, f32)
    g1 = losses.lambda_returns(R3, D3, V3, ones, 1.0, stop_gradient=True)
    gn = losses.n_step_bootstrapped_returns(R3, D3, V3, 3, stop_gradient=True)
    np.testing.assert_allclose(g1, gn, rtol=1e-6)
    # ... and lambda = 0 equals n = 1.
    g0 = losses.lambda_returns(R3, D3, V3, ones, 0.0, stop_gradient=True)
    gn = losses.n_step_bootstrapped_returns(R3, D3, V3, 1, stop_gradient=True)
    np.testing.assert_allclose(g0, gn, rtol=1e-6)


def test_lambda_traced_and_vmapped():
    # lambda_ as a traced argument (one compile for every value), and vmapped over a sweep.
    fn = jax.jit(lambda lam: losses.lambda_returns(SEQ_R, SEQ_D, SEQ_V_T, SEQ_C, lam,
                                                   stop_gradient=True))
    np.testing.assert_allclose(fn(jnp.float32(LAMBDA)), EXPECTED_G, rtol=1e-5)
    gs = jax.vmap(fn)(jnp.array([0.0, LAMBDA], f32))
    np.testing.assert_allclose(gs[0], [2.8, 2.0, 0.9, 4.6, 4.8], rtol=1e-5)
    np.testing.assert_allclose(gs[1], EXPECTED_G, rtol=1e-5)


def test_continue_may_be_bool():
    a = losses.generalized_advantage_estimation(SEQ_R, SEQ_D, SEQ_V_TM1, SEQ_V_T, SEQ_C > 0,
                                                LAMBDA, stop_gradient=True)
    np.testing.assert_allclose(a, EXPECTED_A, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", ON_OFF)
def test_gae_value_gradient_to_v_tm1_always_flows(flag, mode):
    def loss(v_tm1, f):
        return jnp.sum(losses.generalized_advantage_estimation(
            SEQ_R, SEQ_D, v_tm1, SEQ_V_T, SEQ_C, LAMBDA, stop_gradient=f))
    # dA_i/dv_tm1[j] = -(product of d l c between i and j): column sums
    #   j=0: -1; j=1: -(1 + .45*1) = -1.45; j=2: -1; j=3: -(1 + .45) = -1.45; j=4: -1
    # (A_0 reaches A_1 with factor d_0 l c_0 = .45; A_2 reaches A_3 with .45; the rest are 0.)
    np.testing.assert_allclose(_grad(loss, SEQ_V_TM1, flag, mode),
                               [-1.0, -1.45, -1.0, -1.45, -1.0], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Policy losses.

LOGP = jnp.array([-1.0, -2.0], f32)
ADV = jnp.array([2.0, -0.5], f32)


@pytest.mark.parametrize("flag", ON_OFF)
def test_policy_gradient_loss_value(flag):
    # -logp * adv = [-(-1)*2, -(-2)*(-.5)] = [2, -1]
    np.testing.assert_allclose(losses.policy_gradient_loss(LOGP, ADV, stop_gradient=flag),
                               [2.0, -1.0])
    # scalar case: -(-1) * 3 = 3
    np.testing.assert_allclose(
        losses.policy_gradient_loss(f32(-1.0), f32(3.0), stop_gradient=flag), 3.0)


def test_policy_gradient_loss_grad_logp():
    # d(sum loss)/dlogp = -adv = [-2, .5], whatever the flag.
    for flag in ON_OFF:
        g = jax.grad(lambda lp: jnp.sum(losses.policy_gradient_loss(lp, ADV, stop_gradient=flag)))
        np.testing.assert_allclose(g(LOGP), [-2.0, 0.5])


# Four samples, logp_old = 0, epsilon = 0.2:
#   ratio 1.5, adv  2: min(1.5*2 = 3,    1.2*2 = 2.4)   = 2.4  -> loss -2.4  (clipped)
#   ratio 1.5, adv -2: min(-3,           -2.4)          = -3   -> loss  3    (unclipped)
#   ratio 0.5, adv  2: min(1,            0.8*2 = 1.6)   = 1    -> loss -1    (unclipped)
#   ratio 0.5, adv -2: min(-1,           -1.6)          = -1.6 -> loss  1.6  (clipped)
PPO_LOGP = jnp.log(jnp.array([1.5, 1.5, 0.5, 0.5], f32))
PPO_LOGP_OLD = jnp.zeros(4, f32)
PPO_ADV = jnp.array([2.0, -2.0, 2.0, -2.0], f32)


@pytest.mark.parametrize("flag", ON_OFF)
def test_ppo_clipped_surrogate_value(flag):
    loss = losses.ppo_clipped_surrogate(PPO_LOGP, PPO_LOGP_OLD, PPO_ADV, f32(0.2),
                                        stop_gradient=flag)
    np.testing.assert_allclose(loss, [-2.4, 3.0, -1.0, 1.6], rtol=1e-5)


def test_ppo_clipped_surrogate_grad_logp():
    # d loss / d logp = -ratio * adv where unclipped, 0 where clipped: [0, 3, -1, 0]
    g = jax.grad(lambda lp: jnp.sum(losses.ppo_clipped_surrogate(
        lp, PPO_LOGP_OLD, PPO_ADV, f32(0.2), stop_gradient=True)))(PPO_LOGP)
    np.testing.assert_allclose(g, [0.0, 3.0, -1.0, 0.0], rtol=1e-5, atol=1e-7)


def test_ppo_ratio_one_is_policy_gradient_value():
    # At ratio 1 the surrogate's value is -adv, and its gradient w.r.t. logp is -adv.
    def loss(logp):
        return losses.ppo_clipped_surrogate(logp, PPO_LOGP_OLD, PPO_ADV, f32(0.2),
                                            stop_gradient=True)
    np.testing.assert_allclose(loss(PPO_LOGP_OLD), -PPO_ADV)
    np.testing.assert_allclose(jax.grad(lambda lp: jnp.sum(loss(lp)))(PPO_LOGP_OLD), -PPO_ADV)


def test_clipped_value_loss_value():
    v = jnp.array([2.0, 1.2, 0.0], f32)
    v_old = jnp.array([1.0, 1.0, 1.0], f32)
    target = jnp.array([3.0, 3.0, 0.2], f32)
    # eps = .5
    # 0: unclipped (2-3)^2 = 1; clipped 1 + .5 = 1.5 -> (1.5-3)^2 = 2.25; .5*max = 1.125
    # 1: unclipped (1.2-3)^2 = 3.24; clipped 1.2 (inside) -> 3.24; .5*3.24 = 1.62
    # 2: unclipped (0-.2)^2 = .04; clipped 1 - .5 = .5 -> (.5-.2)^2 = .09; .5*.09 = .045
    loss = losses.clipped_value_loss(v, v_old, target, f32(0.5))
    np.testing.assert_allclose(loss, [1.125, 1.62, 0.045], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Distributions.

def test_categorical():
    # logits [0, 0, log 2] -> p = [1/4, 1/4, 1/2]
    logits = jnp.array([0.0, 0.0, np.log(2.0)], f32)
    # log p(2) = log(1/2) = -0.693147; log p(0) = log(1/4) = -1.386294
    np.testing.assert_allclose(losses.categorical_log_prob(logits, jnp.int32(2)), -0.693147,
                               rtol=1e-5)
    np.testing.assert_allclose(losses.categorical_log_prob(logits, jnp.int32(0)), -1.386294,
                               rtol=1e-5)
    # H = -(2 * 1/4 log 1/4 + 1/2 log 1/2) = .5 log 4 + .5 log 2 = 1.5 log 2 = 1.039721
    np.testing.assert_allclose(losses.categorical_entropy(logits), 1.039721, rtol=1e-5)
    # uniform over 4: H = log 4 = 1.386294
    np.testing.assert_allclose(losses.categorical_entropy(jnp.zeros(4, f32)), 1.386294, rtol=1e-5)


def test_categorical_vmap():
    logits = jnp.array([[0.0, 0.0], [0.0, np.log(3.0)]], f32)
    # row 0: p = [.5, .5], log p(1) = -0.693147; row 1: p = [.25, .75], log p(1) = log .75
    lp = jax.vmap(losses.categorical_log_prob)(logits, jnp.array([1, 1]))
    np.testing.assert_allclose(lp, [-0.693147, np.log(0.75)], rtol=1e-5)


def test_gaussian():
    mean = jnp.array([0.0, 1.0], f32)
    log_std = jnp.array([0.0, np.log(2.0)], f32)
    a = jnp.array([1.0, 1.0], f32)
    # dim 0: -.5 * 1^2 - 0 - .5 log 2pi;  dim 1: -.5 * 0^2 - log 2 - .5 log 2pi
    # total = -.5 - .693147 - 1.837877 = -3.031024
    np.testing.assert_allclose(losses.gaussian_log_prob(mean, log_std, a), -3.031024, rtol=1e-5)
    expected = jnp.sum(jax.scipy.stats.norm.logpdf(a, mean, jnp.exp(log_std)))
    np.testing.assert_allclose(losses.gaussian_log_prob(mean, log_std, a), expected, rtol=1e-5)
    # H = sum(log std + .5 (1 + log 2pi)) = log 2 + 2 * 1.418939 = 3.531024
    np.testing.assert_allclose(losses.gaussian_entropy(log_std), 3.531024, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Every switch: the gradient through the detached input is exactly zero when on, non-zero when
# off, with the flag as a Python bool, a jitted tracer and a vmapped tracer.

SWITCHES = {
    # name: (loss(x, flag), x = the input the flag detaches)
    "q_learning": (
        lambda q_t, f: losses.q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, q_t, stop_gradient=f)**2,
        Q_T),
    "double_q_learning": (
        lambda q_t, f: losses.double_q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, q_t,
                                                Q_T_SELECTOR, stop_gradient=f)**2,
        Q_T),
    "td_learning": (
        lambda v_t, f: losses.td_learning(f32(2.0), f32(1.0), f32(0.5), v_t,
                                          stop_gradient=f)**2,
        f32(4.0)),
    "n_step_bootstrapped_returns": (
        lambda v_t, f: jnp.sum(losses.n_step_bootstrapped_returns(R3, D3, v_t, 2,
                                                                  stop_gradient=f)),
        V3),
    "lambda_returns": (
        lambda v_t, f: jnp.sum(losses.lambda_returns(SEQ_R, SEQ_D, v_t, SEQ_C, LAMBDA,
                                                     stop_gradient=f)),
        SEQ_V_T),
    "generalized_advantage_estimation": (
        lambda v_t, f: jnp.sum(losses.generalized_advantage_estimation(
            SEQ_R, SEQ_D, SEQ_V_TM1, v_t, SEQ_C, LAMBDA, stop_gradient=f)),
        SEQ_V_T),
    "policy_gradient_loss": (
        lambda adv, f: jnp.sum(losses.policy_gradient_loss(LOGP, adv, stop_gradient=f)),
        ADV),
    "ppo_clipped_surrogate": (
        lambda adv, f: jnp.sum(losses.ppo_clipped_surrogate(PPO_LOGP, PPO_LOGP_OLD, adv,
                                                            f32(0.2), stop_gradient=f)),
        PPO_ADV),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", ON_OFF)
@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_stop_gradient_switch(name, flag, mode):
    loss, x = SWITCHES[name]
    _check_switch(_grad(loss, x, flag, mode), flag)


@pytest.mark.parametrize(
    "name, expected",
    [
        # d(td^2)/dq_t = 2 * td * d at the argmax (index 0): 2 * 2.1 * .9 = 3.78
        ("q_learning", [3.78, 0.0, 0.0]),
        # d(td^2)/dq_t_value = 2 * td * d at a* = 2: 2 * .3 * .9 = .54
        ("double_q_learning", [0.0, 0.0, 0.54]),
        # d(td^2)/dv_t = 2 * td * d = 2 * 1 * .5 = 1
        ("td_learning", 1.0),
        # sum_i G_i with n = 2 (d = .5): v_t[1] enters G_0 with .25; v_t[2] enters G_1 with .25
        # and G_2 with .5 -> [0, .25, .75]
        ("n_step_bootstrapped_returns", [0.0, 0.25, 0.75]),
        # sum_i G_i, from the worked example: dG/dv_t[j] summed over i
        #   v_t[0]: G_0 via (1 - l) d_0 = .45                         -> .45
        #   v_t[1]: d_1 = 0                                           -> 0
        #   v_t[2]: G_2 via .45                                       -> .45
        #   v_t[3]: G_3 via d_3 (c_3 = 0) = .9, G_2 via .45 * .9      -> .9 + .405 = 1.305
        #   v_t[4]: G_4 via .9 (last step, full bootstrap)            -> .9
        ("lambda_returns", [0.45, 0.0, 0.45, 1.305, 0.9]),
        # sum_i A_i: v_t[j] enters delta_j with d_j; delta_3 also reaches A_2 with .45
        #   [.9, 0, .9, .9 + .45*.9 = 1.305, .9]
        ("generalized_advantage_estimation", [0.9, 0.0, 0.9, 1.305, 0.9]),
        # -logp = [1, 2]
        ("policy_gradient_loss", [1.0, 2.0]),
        # -(selected ratio): [-1.2, -1.5, -.5, -.8]
        ("ppo_clipped_surrogate", [-1.2, -1.5, -0.5, -0.8]),
    ])
def test_stop_gradient_off_gradient_values(name, expected):
    loss, x = SWITCHES[name]
    np.testing.assert_allclose(jax.grad(loss)(x, False), expected, rtol=1e-5, atol=1e-7)


def test_one_compile_serves_both_flags():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def grads(v_t, flag):
        return jax.grad(lambda v: jnp.sum(losses.generalized_advantage_estimation(
            SEQ_R, SEQ_D, SEQ_V_TM1, v, SEQ_C, LAMBDA, stop_gradient=flag)))(v_t)

    _check_switch(grads(SEQ_V_T, jnp.bool_(True)), True)
    _check_switch(grads(SEQ_V_T, jnp.bool_(False)), False)


def test_flag_must_be_scalar():
    with pytest.raises(AssertionError):
        losses.td_learning(f32(2.0), f32(1.0), f32(0.5), f32(4.0),
                           stop_gradient=jnp.array([True, False]))
