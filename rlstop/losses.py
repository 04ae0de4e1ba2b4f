"""Loss math on arrays, in the manner of rlax.

Every function here is pure and works on ONE transition or ONE sequence; the caller batches with
`jax.vmap`. Names follow rlax: `_tm1` is the time step whose estimate is being updated, `_t` the
one it bootstraps from. Functions return TD errors, targets, advantages or per-sample losses,
never batch-reduced means.

Every bootstrapped target and every advantage takes a keyword-only `stop_gradient` flag with no
default. It may be a Python bool or a traced boolean scalar (inside `jit` / `vmap`), so that one
compile serves both settings. When on, the gradient through the detached input is exactly zero;
when off, it flows (residual-gradient TD; policy loss back-propagating into the critic).
"""

import chex
import jax
import jax.numpy as jnp

Array = chex.Array
Numeric = chex.Numeric


def _maybe_stop(x: Array, flag: Numeric) -> Array:
    """Returns `stop_gradient(x)` where `flag` is true, else `x` (flag may be traced).

    `jnp.where` back-propagates zero into the branch it did not select, so with the flag on the
    gradient through `x` is exactly zero, and with it off it is the identity's.
    """
    return jnp.where(flag, jax.lax.stop_gradient(x), x)


def q_learning(
        q_tm1: Array,
        a_tm1: Numeric,
        r_t: Numeric,
        discount_t: Numeric,
        q_t: Array,
        *,
        stop_gradient: Numeric,
) -> Array:
    """Q-learning TD error (Watkins 1989; Watkins & Dayan 1992).

        target = r_t + discount_t * max_a q_t[a]
        td_error = target - q_tm1[a_tm1]

    The loss is usually `0.5 * td_error**2` (or a Huber loss); its gradient w.r.t. `q_tm1` is the
    semi-gradient update when the target is detached, the residual gradient (Baird 1995) when not.

    Args:
        q_tm1: Q-values at time t-1, shape [A].
        a_tm1: action taken at time t-1, int, shape [].
        r_t: reward at time t, shape [].
        discount_t: discount at time t, shape []; `gamma * (1 - terminated_t)`.
        q_t: Q-values at time t, shape [A] (from the target or the online network).
        stop_gradient: keyword-only, bool or traced bool scalar: detach the target.

    Returns:
        The TD error, shape [].
    """
    chex.assert_rank([q_tm1, a_tm1, r_t, discount_t, q_t], [1, 0, 0, 0, 1])
    chex.assert_type([q_tm1, a_tm1, r_t, discount_t, q_t],
                     [float, int, float, float, float])
    target = r_t + discount_t * jnp.max(q_t)
    target = _maybe_stop(target, stop_gradient)
    return target - q_tm1[a_tm1]


def double_q_learning(
        q_tm1: Array,
        a_tm1: Numeric,
        r_t: Numeric,
        discount_t: Numeric,
        q_t_value: Array,
        q_t_selector: Array,
        *,
        stop_gradient: Numeric,
) -> Array:
    """Double Q-learning TD error (van Hasselt 2010; van Hasselt, Guez & Silver 2016).

        a* = argmax_a q_t_selector[a]
        target = r_t + discount_t * q_t_value[a*]
        td_error = target - q_tm1[a_tm1]

    In Double DQN `q_t_value` comes from the target network and `q_t_selector` from the online
    network. The argmax is discrete, so `q_t_selector` never receives gradient, whatever the flag.

    Args:
        q_tm1: Q-values at time t-1, shape [A].
        a_tm1: action taken at time t-1, int, shape [].
        r_t: reward at time t, shape [].
        discount_t: discount at time t, shape []; `gamma * (1 - terminated_t)`.
        q_t_value: Q-values at time t used to evaluate the chosen action, shape [A].
        q_t_selector: Q-values at time t used to choose the action, shape [A].
        stop_gradient: keyword-only, bool or traced bool scalar: detach the target.

    Returns:
        The TD error, shape [].
    """
    chex.assert_rank([q_tm1, a_tm1, r_t, discount_t, q_t_value, q_t_selector],
                     [1, 0, 0, 0, 1, 1])
    chex.assert_type([q_tm1, a_tm1, r_t, discount_t, q_t_value, q_t_selector],
                     [float, int, float, float, float, float])
    # The selection is explicitly detached: argmax has no gradient, and saying so keeps it that way
    # should anyone swap in a soft selection.
    a_star = jnp.argmax(jax.lax.stop_gradient(q_t_selector))
    target = r_t + discount_t * q_t_value[a_star]
    target = _maybe_stop(target, stop_gradient)
    return target - q_tm1[a_tm1]


def td_learning(
        v_tm1: Numeric,
        r_t: Numeric,
        discount_t: Numeric,
        v_t: Numeric,
        *,
        stop_gradient: Numeric,
) -> Array:
    """TD(0) error for state values (Sutton 1988; Sutton & Barto 2018, sec. 6.1).

        target = r_t + discount_t * v_t
        td_error = target - v_tm1

    Args:
        v_tm1: value estimate at time t-1, shape [].
        r_t: reward at time t, shape [].
        discount_t: discount at time t, shape []; `gamma * (1 - terminated_t)`.
        v_t: value estimate at time t, shape [].
        stop_gradient: keyword-only, bool or traced bool scalar: detach the target.

    Returns:
        The TD error, shape [].
    """
    chex.assert_rank([v_tm1, r_t, discount_t, v_t], 0)
    chex.assert_type([v_tm1, r_t, discount_t, v_t], float)
    target = r_t + discount_t * v_t
    target = _maybe_stop(target, stop_gradient)
    return target - v_tm1
