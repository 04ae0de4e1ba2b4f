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
# argument into `jax.jit`, so `_maybe_stop` sees a tracer.
MODES = ["python", "traced"]


def _grad(loss, x, flag, mode):
    """Gradient of loss(x, flag) w.r.t. x, with flag a Python bool or a traced jnp.bool_."""
    if mode == "python":
        return jax.grad(lambda x_: loss(x_, flag))(x)
    return jax.jit(jax.grad(loss))(x, jnp.bool_(flag))


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
def test_q_learning_stop_gradient(flag, mode):
    def loss(q_t, f):
        return losses.q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, q_t, stop_gradient=f) ** 2
    g = _grad(loss, Q_T, flag, mode)
    _check_switch(g, flag)
    if not flag:
        # d(td^2)/dq_t = 2 * td * 0.9 at the argmax (index 0): 2 * 2.1 * 0.9 = 3.78
        np.testing.assert_allclose(g, [3.78, 0.0, 0.0], rtol=1e-5)


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
def test_double_q_learning_stop_gradient_value(flag, mode):
    def loss(q_t_value, f):
        return losses.double_q_learning(Q_TM1, A_TM1, R_T, DISCOUNT_T, q_t_value, Q_T_SELECTOR,
                                        stop_gradient=f) ** 2
    g = _grad(loss, Q_T, flag, mode)
    _check_switch(g, flag)
    if not flag:
        # d(td^2)/dq_t_value = 2 * td * 0.9 at a* = 2: 2 * 0.3 * 0.9 = 0.54
        np.testing.assert_allclose(g, [0.0, 0.0, 0.54], rtol=1e-4)


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", ON_OFF)
def test_td_learning_stop_gradient(flag, mode):
    def loss(v_t, f):
        return 0.5 * losses.td_learning(f32(2.0), f32(1.0), f32(0.5), v_t, stop_gradient=f) ** 2
    g = _grad(loss, f32(4.0), flag, mode)
    _check_switch(g, flag)
    if not flag:
        # d(0.5 td^2)/dv_t = td * 0.5 = 0.5
        np.testing.assert_allclose(g, 0.5, rtol=1e-6)


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
