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
    # A scalar switch: an array of flags would broadcast silently over the elements of x.
    chex.assert_rank(flag, 0)
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


def n_step_bootstrapped_returns(
        r_t: Array,
        discount_t: Array,
        v_t: Array,
        n: int,
        *,
        stop_gradient: Numeric,
) -> Array:
    """n-step bootstrapped returns for a sequence (Sutton & Barto 2018, sec. 7.1).

        G_i = r_i + d_i r_{i+1} + ... + (d_i ... d_{i+n-2}) r_{i+n-1}
                  + (d_i ... d_{i+n-1}) v_t[i+n-1]

    where `d = discount_t`. Near the end of the sequence the return is truncated and bootstraps
    from `v_t[-1]`, the value after the last step. A termination (`d_j = 0`) cuts off everything
    after it. Truncations *inside* the sequence are not seen here (there is no `continue_t`);
    where they occur, use `lambda_returns`, which takes one.

    Args:
      r_t: rewards, shape [T]; `r_t[i]` is the reward of step i.
      discount_t: discounts, shape [T]; `gamma * (1 - terminated_t)`.
      v_t: bootstrap values, shape [T]; `v_t[i]` is the value of the state after step i.
      n: number of steps (a static Python int, >= 1).
      stop_gradient: keyword-only, bool or traced bool scalar: detach the returns.

    Returns:
      The n-step returns, shape [T].
    """
    chex.assert_rank([r_t, discount_t, v_t], 1)
    chex.assert_type([r_t, discount_t, v_t], float)
    chex.assert_equal_shape([r_t, discount_t, v_t])
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a Python int >= 1, got {n!r}")
    seq_len = r_t.shape[0]
    # Pad past the end with reward 0, discount 1 and value v_t[-1], so that returns that would
    # run off the sequence stop there and bootstrap from its last value.
    r_pad = jnp.concatenate([r_t, jnp.zeros((n - 1,), r_t.dtype)])
    d_pad = jnp.concatenate([discount_t, jnp.ones((n - 1,), discount_t.dtype)])
    v_pad = jnp.concatenate([v_t, jnp.full((n - 1,), v_t[-1], v_t.dtype)])
    returns = v_pad[n - 1:n - 1 + seq_len]
    for k in reversed(range(n)):  # n is static and small: unrolled, as in rlax.
        returns = r_pad[k:k + seq_len] + d_pad[k:k + seq_len] * returns
    return _maybe_stop(returns, stop_gradient)


def lambda_returns(
        r_t: Array,
        discount_t: Array,
        v_t: Array,
        continue_t: Array,
        lambda_: Numeric,
        *,
        stop_gradient: Numeric,
) -> Array:
    """TD(lambda) returns for a sequence that may hold episode boundaries.

    The lambda-return (Sutton & Barto 2018, sec. 12.1; Watkins 1989), computed backwards with
    `G_T := v_t[-1]`:

        G_i = r_i + d_i * ((1 - lambda * c_i) * v_t[i] + lambda * c_i * G_{i+1})

    with `d = discount_t` and `c = continue_t`. Where an episode ends at step i (`c_i = 0`) the
    trace is cut, so it never crosses into the next episode: a termination (`d_i = 0`) gives
    `G_i = r_i`, and a time-limit truncation (`d_i = gamma`) bootstraps from `v_t[i]`, the value
    of the true final observation.

    Args:
      r_t: rewards, shape [T].
      discount_t: discounts, shape [T]; `gamma * (1 - terminated_t)`.
      v_t: bootstrap values, shape [T]; `v_t[i]` is the value of the true next observation of
        step i (the final observation where the episode ended, not the reset one).
      continue_t: shape [T]; 0 where the episode ended at step i (by termination or
        truncation), 1 elsewhere. Float or bool.
      lambda_: trace parameter in [0, 1], shape [] or [T]; may be traced.
      stop_gradient: keyword-only, bool or traced bool scalar: detach the returns.

    Returns:
      The lambda-returns, shape [T].
    """
    chex.assert_rank([r_t, discount_t, v_t, continue_t, lambda_], [1, 1, 1, 1, {0, 1}])
    chex.assert_type([r_t, discount_t, v_t], float)
    chex.assert_equal_shape([r_t, discount_t, v_t, continue_t])
    lc_t = jnp.broadcast_to(lambda_, r_t.shape) * continue_t.astype(r_t.dtype)

    def step(g_next, xs):
        r, d, v, lc = xs
        g = r + d * ((1.0 - lc) * v + lc * g_next)
        return g, g

    _, returns = jax.lax.scan(step, v_t[-1], (r_t, discount_t, v_t, lc_t), reverse=True)
    return _maybe_stop(returns, stop_gradient)


def generalized_advantage_estimation(
        r_t: Array,
        discount_t: Array,
        v_tm1: Array,
        v_t: Array,
        continue_t: Array,
        lambda_: Numeric,
        *,
        stop_gradient: Numeric,
) -> Array:
    """Generalized advantage estimation (Schulman et al. 2016), episode-boundary aware.

        delta_i = r_i + d_i * v_t[i] - v_tm1[i]
        A_i = delta_i + d_i * lambda * c_i * A_{i+1},    A_T := 0

    with `d = discount_t` and `c = continue_t`, so the trace never crosses an episode boundary
    and a truncated step still bootstraps from `v_t[i]`. Where the sequence is consistent
    (`v_tm1[i+1] == v_t[i]` wherever `c_i = 1`),

        A = lambda_returns(r_t, discount_t, v_t, continue_t, lambda_) - v_tm1.

    The flag detaches only the bootstrap values `v_t`; `v_tm1` always keeps its gradient.
    Whether the advantage as a whole is detached in the policy loss is the switch of
    `policy_gradient_loss` / `ppo_clipped_surrogate`.

    Args:
      r_t: rewards, shape [T].
      discount_t: discounts, shape [T]; `gamma * (1 - terminated_t)`.
      v_tm1: values of the states the steps start from, shape [T].
      v_t: values of the true next observations, shape [T] (final observation where the
        episode ended).
      continue_t: shape [T]; 0 where the episode ended at step i (by termination or
        truncation), 1 elsewhere. Float or bool.
      lambda_: GAE parameter in [0, 1], shape [] or [T]; may be traced.
      stop_gradient: keyword-only, bool or traced bool scalar: detach `v_t`.

    Returns:
      The advantages, shape [T].
    """
    chex.assert_rank([r_t, discount_t, v_tm1, v_t, continue_t, lambda_],
                     [1, 1, 1, 1, 1, {0, 1}])
    chex.assert_type([r_t, discount_t, v_tm1, v_t], float)
    chex.assert_equal_shape([r_t, discount_t, v_tm1, v_t, continue_t])
    v_t = _maybe_stop(v_t, stop_gradient)
    delta_t = r_t + discount_t * v_t - v_tm1
    dlc_t = discount_t * jnp.broadcast_to(lambda_, r_t.shape) * continue_t.astype(r_t.dtype)

    def step(a_next, xs):
        delta, dlc = xs
        a = delta + dlc * a_next
        return a, a

    _, advantages = jax.lax.scan(step, jnp.zeros((), delta_t.dtype), (delta_t, dlc_t),
                                 reverse=True)
    return advantages


def policy_gradient_loss(
        logp_t: Array,
        adv_t: Array,
        *,
        stop_gradient: Numeric,
) -> Array:
    """Per-sample policy-gradient loss (Williams 1992; Sutton et al. 2000; Mnih et al. 2016).

        loss = -logp_t * adv_t

    Its gradient w.r.t. the policy parameters is `-adv * grad log pi(a|s)`. With the advantage
    detached (the usual choice) the loss trains only the policy; with it attached the policy
    loss also back-propagates into whatever computed the advantage (the critic).

    Args:
      logp_t: log-probabilities of the actions taken, shape [B] or [].
      adv_t: advantages, same shape as `logp_t`.
      stop_gradient: keyword-only, bool or traced bool scalar: detach `adv_t`.

    Returns:
      The per-sample loss, same shape as `logp_t`.
    """
    chex.assert_rank([logp_t, adv_t], {0, 1})
    chex.assert_type([logp_t, adv_t], float)
    chex.assert_equal_shape([logp_t, adv_t])
    return -logp_t * _maybe_stop(adv_t, stop_gradient)


def ppo_clipped_surrogate(
        logp_t: Array,
        logp_old_t: Array,
        adv_t: Array,
        epsilon: Numeric,
        *,
        stop_gradient: Numeric,
) -> Array:
    """Per-sample PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), negated.

        ratio = exp(logp_t - logp_old_t)
        loss = -min(ratio * adv, clip(ratio, 1 - epsilon, 1 + epsilon) * adv)

    `logp_old_t` is data from the rollout policy; nothing here detaches it.

    Args:
      logp_t: log-probabilities of the actions under the current policy, shape [B] or [].
      logp_old_t: log-probabilities under the policy that collected the data, same shape.
      adv_t: advantages, same shape.
      epsilon: clipping parameter, shape []; may be traced.
      stop_gradient: keyword-only, bool or traced bool scalar: detach `adv_t`.

    Returns:
      The per-sample loss (to minimise), same shape as `logp_t`.
    """
    chex.assert_rank([logp_t, logp_old_t, adv_t], {0, 1})
    chex.assert_rank(epsilon, 0)
    chex.assert_type([logp_t, logp_old_t, adv_t], float)
    chex.assert_equal_shape([logp_t, logp_old_t, adv_t])
    adv_t = _maybe_stop(adv_t, stop_gradient)
    ratio = jnp.exp(logp_t - logp_old_t)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    return -jnp.minimum(ratio * adv_t, clipped_ratio * adv_t)


def clipped_value_loss(
        v_t: Array,
        v_old_t: Array,
        target_t: Array,
        epsilon: Numeric,
) -> Array:
    """Per-sample PPO clipped value loss (as in the OpenAI baselines PPO2 implementation).

        v_clipped = v_old + clip(v - v_old, -epsilon, epsilon)
        loss = 0.5 * max((v - target)^2, (v_clipped - target)^2)

    There is no switch here: `target_t` comes from `lambda_returns` or GAE, whose
    `stop_gradient` flag decides whether it is detached.

    Args:
      v_t: current value estimates, shape [B] or [].
      v_old_t: value estimates at data-collection time, same shape.
      target_t: value targets (e.g. lambda-returns), same shape.
      epsilon: clipping parameter, shape []; may be traced.

    Returns:
      The per-sample loss, same shape as `v_t`.
    """
    chex.assert_rank([v_t, v_old_t, target_t], {0, 1})
    chex.assert_rank(epsilon, 0)
    chex.assert_type([v_t, v_old_t, target_t], float)
    chex.assert_equal_shape([v_t, v_old_t, target_t])
    v_clipped = v_old_t + jnp.clip(v_t - v_old_t, -epsilon, epsilon)
    return 0.5 * jnp.maximum(jnp.square(v_t - target_t), jnp.square(v_clipped - target_t))


def categorical_log_prob(logits: Array, a: Numeric) -> Array:
    """Log-probability of action `a` under softmax(logits).

    Args:
      logits: unnormalised log-probabilities, shape [A].
      a: action, int, shape [].

    Returns:
      `log softmax(logits)[a]`, shape [].
    """
    chex.assert_rank([logits, a], [1, 0])
    chex.assert_type([logits, a], [float, int])
    return jax.nn.log_softmax(logits)[a]


def categorical_entropy(logits: Array) -> Array:
    """Entropy of softmax(logits): `H = -sum_a p_a log p_a`.

    Args:
      logits: unnormalised log-probabilities, shape [A].

    Returns:
      The entropy in nats, shape [].
    """
    chex.assert_rank(logits, 1)
    chex.assert_type(logits, float)
    log_p = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(log_p) * log_p)


def gaussian_log_prob(mean: Array, log_std: Array, a: Array) -> Array:
    """Log-density of `a` under a diagonal Gaussian N(mean, diag(exp(log_std))^2).

        log p(a) = sum_d [ -0.5 ((a_d - mean_d) / std_d)^2 - log std_d - 0.5 log(2 pi) ]

    Args:
      mean: shape [D].
      log_std: shape [D].
      a: action, shape [D].

    Returns:
      The log-density, summed over D, shape [].
    """
    chex.assert_rank([mean, log_std, a], 1)
    chex.assert_type([mean, log_std, a], float)
    chex.assert_equal_shape([mean, log_std, a])
    z = (a - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * jnp.square(z) - log_std - 0.5 * jnp.log(2.0 * jnp.pi))


def gaussian_entropy(log_std: Array) -> Array:
    """Entropy of a diagonal Gaussian: `H = sum_d [ log std_d + 0.5 (1 + log(2 pi)) ]`.

    Args:
      log_std: shape [D].

    Returns:
      The entropy in nats, shape [].
    """
    chex.assert_rank(log_std, 1)
    chex.assert_type(log_std, float)
    return jnp.sum(log_std + 0.5 * (1.0 + jnp.log(2.0 * jnp.pi)))
