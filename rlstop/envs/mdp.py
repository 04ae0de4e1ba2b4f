"""Finite MDPs for linear TD prediction experiments (Sutton & Barto 2nd ed., chapter 11).

An MDP here is a handful of arrays (:class:`FiniteMDP`): transition probabilities, expected
rewards, terminal flags, a start distribution, a feature matrix for linear value functions, a
behaviour and a target policy, a discount and the weights learning starts from.

Three groups of functions use it:

* builders: :func:`baird` (Baird's counterexample, S&B Figure 11.2), :func:`two_state` (the
  w -> 2w fragment that opens S&B section 11.2), :func:`from_dict` (a user's MDP from YAML, fully
  validated) and :func:`make_mdp` (dispatch on ``env.id``);
* exact analysis on the host, in numpy float64 -- the ground truth for tests and metrics:
  :func:`true_values`, :func:`behavior_state_distribution`, :func:`expected_td_matrix`,
  :func:`td_fixed_point`;
* JAX sampling, pure and jit/vmap friendly, keys explicit: :func:`reset`, :func:`step`.

Episodes and restarts
---------------------
A terminal state has value 0 and nothing bootstraps out of it. An episode that *enters* a
terminal state ends there and the next one starts from a fresh draw of ``start``; a terminal
state is therefore never the state an update is made in (its on-policy weight is 0), and its row
of ``transitions`` is never used. :func:`step` returns both the true next state (bootstrap from
it with ``discount = gamma * (1 - terminated)``) and the state to continue from (the next state,
or a fresh start state if the next state is terminal). These MDPs have no time limit, so nothing
is ever truncated. A continuing MDP (no terminal states) needs ``gamma < 1``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlstop.errors import UserError

# Baird's two actions (S&B Figure 11.2).
BAIRD_DASHED = 0  # to one of the six upper states, uniformly
BAIRD_SOLID = 1  # to the lower state (state index 6, the book's state 7)

ENV_IDS = ("baird", "two_state", "finite_mdp")

_PROB_ATOL = 1e-6  # how far a user's probability row may be from summing to 1


@flax.struct.dataclass
class FiniteMDP:
    """A finite MDP with linear features, a behaviour policy and a target policy.

    Leaves are numpy float64 arrays as built (so the host-side analysis is exact); inside jitted
    code they arrive as jax arrays (float32 unless x64 is on). Pass an MDP to jitted functions as
    an ordinary argument, never as a static one. S states, A actions, d features.

    Attributes:
      transitions: P[S, A, S], P[s, a, s'] = Pr(s' | s, a); rows of terminal states are unused.
      rewards: R[S, A], the expected reward of taking a in s (the sampler pays exactly this).
      terminal: bool[S]; a terminal state has value 0 and entering it ends the episode.
      start: [S], the distribution episodes (re)start from; no mass on terminal states.
      features: X[S, d], the linear value estimate is v(s) = X[s] . w.
      behavior_policy: b[S, A], the policy that generates the data.
      target_policy: pi[S, A], the policy whose values are learned.
      gamma: the discount, in [0, 1].
      initial_weights: [d], where learning starts.
      name: static metadata (not a pytree leaf).
    """

    transitions: Any
    rewards: Any
    terminal: Any
    start: Any
    features: Any
    behavior_policy: Any
    target_policy: Any
    gamma: Any
    initial_weights: Any
    name: str = flax.struct.field(pytree_node=False, default="finite_mdp")

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    @property
    def num_actions(self) -> int:
        return self.transitions.shape[1]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def reward_bound(self) -> float:
        """r_max of the soft-divergence bound r_max / (1 - gamma) (van Hasselt et al. 2018).

        max |R| over states and actions, but at least 1: with all rewards 0 (Baird's example,
        two-state) max |R| would make the bound 0 and flag the initial weights; with the floor
        the bound is 100 at gamma = 0.99. Host side only (reads the arrays as numpy).
        """
        return max(1.0, float(np.max(np.abs(np.asarray(self.rewards)), initial=0.0)))


@flax.struct.dataclass
class Transition:
    """One sampled step of a :class:`FiniteMDP` (all fields are scalars; batch with vmap).

    Attributes:
      state: s_t (int32), the state the action was taken in.
      action: a_t ~ b(. | s_t) (int32).
      reward: r_{t+1} = R[s_t, a_t].
      next_state: s_{t+1} ~ P[s_t, a_t] (int32), the true next state: bootstrap from it.
      terminated: whether s_{t+1} is terminal; use ``discount = gamma * (1 - terminated)``.
      rho: the importance-sampling ratio pi(a_t | s_t) / b(a_t | s_t).
      continue_state: where the stream goes on from (int32): ``next_state``, or a fresh draw
        from ``start`` if ``next_state`` is terminal. Pass it to the next :func:`step`.
    """

    state: jax.Array
    action: jax.Array
    reward: jax.Array
    next_state: jax.Array
    terminated: jax.Array
    rho: jax.Array
    continue_state: jax.Array


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def baird(gamma: float = 0.99) -> FiniteMDP:
    """Baird's counterexample exactly as Sutton & Barto (2nd ed.), section 11.2, Figure 11.2.

    Seven states: six upper states (indices 0..5, the book's 1..6) and one lower state (index 6,
    the book's 7). Features are 8-dimensional: x(i) = 2 e_i + e_8 for the upper states and
    x(7) = e_7 + 2 e_8. Action ``BAIRD_DASHED`` (0) goes to one of the six upper states uniformly,
    ``BAIRD_SOLID`` (1) goes to the lower state, from every state. Behaviour b = (6/7, 1/7),
    target pi = solid always, so rho = 7 on solid and 0 on dashed. All rewards 0 (v_pi = 0),
    continuing (no terminal states), start uniform over the seven states, initial weights
    w = (1, 1, 1, 1, 1, 1, 10, 1). The behaviour policy's state distribution is uniform (from any
    state the next state is uniform), so the expected (DP) semi-gradient update is
    w <- w + (alpha / 7) sum_s (gamma x(7).w - x(s).w) x(s), which diverges for every alpha > 0.
    """
    _check_gamma(gamma, "baird gamma", continuing=True)
    n = 7
    features = np.zeros((n, 8))
    for i in range(6):
        features[i, i] = 2.0
        features[i, 7] = 1.0
    features[6, 6] = 1.0
    features[6, 7] = 2.0
    transitions = np.zeros((n, 2, n))
    transitions[:, BAIRD_DASHED, :6] = 1.0 / 6.0
    transitions[:, BAIRD_SOLID, 6] = 1.0
    behavior = np.tile([6.0 / 7.0, 1.0 / 7.0], (n, 1))
    target = np.tile([0.0, 1.0], (n, 1))
    return FiniteMDP(
        transitions=transitions,
        rewards=np.zeros((n, 2)),
        terminal=np.zeros(n, dtype=bool),
        start=np.full(n, 1.0 / n),
        features=features,
        behavior_policy=behavior,
        target_policy=target,
        gamma=float(gamma),
        initial_weights=np.array([1.0, 1, 1, 1, 1, 1, 10, 1]),
        name="baird",
    )


def two_state(gamma: float = 0.9) -> FiniteMDP:
    """The two-state fragment that opens S&B (2nd ed.) section 11.2, closed into an MDP.

    v(s1) = w, v(s2) = 2w: one scalar feature, x(s1) = 1 and x(s2) = 2 (indices 0 and 1).
    s1 -> s2 with reward 0, so the semi-gradient TD(0) update on that transition is
    w <- w + alpha (0 + gamma 2w - w) 1 = (1 + alpha (2 gamma - 1)) w.

    Construction (continuing, as the book's text describes): two actions. In s1 both go to s2;
    behaviour and target both take action 0 there, so rho = 1. In s2 both go back to s1 with
    reward 0; the behaviour policy takes action 0, which the target policy never takes (it takes
    action 1), so rho = 0 in s2 and "no update would be made" on that transition. Hence the only
    transition that ever moves w is s1 -> s2: sampled TD multiplies w by (1 + alpha (2 gamma - 1))
    every second step. The behaviour distribution is (1/2, 1/2); the expected update has the
    1x1 matrix A = (1 - 2 gamma) / 2 and b = 0, divergent for gamma > 1/2 (every alpha > 0).
    v_pi = 0, the TD fixed point is w = 0; start in s1; initial weight 1.

    Note: b does not cover pi in s2 (pi takes an action b never does) -- deliberately; that is
    the point of the example. :func:`from_dict` refuses such an MDP.
    """
    _check_gamma(gamma, "two_state gamma", continuing=True)
    transitions = np.zeros((2, 2, 2))
    transitions[0, :, 1] = 1.0  # s1 -> s2 under both actions
    transitions[1, :, 0] = 1.0  # s2 -> s1 under both actions
    return FiniteMDP(
        transitions=transitions,
        rewards=np.zeros((2, 2)),
        terminal=np.zeros(2, dtype=bool),
        start=np.array([1.0, 0.0]),
        features=np.array([[1.0], [2.0]]),
        behavior_policy=np.array([[1.0, 0.0], [1.0, 0.0]]),
        target_policy=np.array([[1.0, 0.0], [0.0, 1.0]]),
        gamma=float(gamma),
        initial_weights=np.array([1.0]),
        name="two_state",
    )


_REQUIRED_KEYS = {
    "gamma": "the discount, a number in [0, 1]",
    "transitions": "P[s][a][s'], shape [S][A][S]",
    "rewards": "expected reward R[s][a], shape [S][A]",
    "start": "start distribution, S probabilities",
    "features": "one row of d features per state, shape [S][d]",
    "behavior_policy": "b[s][a], shape [S][A]",
}
_OPTIONAL_KEYS = {
    "terminal": "S booleans; default: no terminal states",
    "target_policy": "pi[s][a], shape [S][A]; default: the behaviour policy (on-policy)",
    "initial_weights": "d numbers; default: zeros",
}
MDP_KEYS = tuple(_REQUIRED_KEYS) + tuple(_OPTIONAL_KEYS)


def from_dict(d: Mapping, *, where: str = "env.mdp") -> FiniteMDP:
    """Builds and validates a user's finite MDP, given as nested lists (e.g. from YAML).

    Keys: ``gamma, transitions, rewards, start, features, behavior_policy`` (required) and
    ``terminal`` (default: none), ``target_policy`` (default: the behaviour policy, i.e.
    on-policy), ``initial_weights`` (default: zeros). Probability rows may be off by up to 1e-6
    (e.g. 0.3333333) and are renormalised.

    Raises:
      UserError: with one line naming the bad entry (``where`` is its config path) and how to fix
        it: unknown or missing keys, ragged or wrongly shaped arrays, non-numbers, non-finite
        values, negative probabilities, rows that do not sum to 1, start mass on a terminal state,
        a target policy not covered by the behaviour policy, gamma outside [0, 1], gamma = 1
        where some state never reaches a terminal state under the target policy.
    """
    d = _to_plain(d)
    if not isinstance(d, Mapping):
        raise UserError(
            f"{where} must be a mapping with keys {', '.join(MDP_KEYS)}, got {type(d).__name__}"
        )
    for key in d:
        if key not in MDP_KEYS:
            close = difflib.get_close_matches(str(key), MDP_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(
                f"{where} has unknown key '{key}'{hint}; valid keys: {', '.join(MDP_KEYS)}"
            )
    for key, meaning in _REQUIRED_KEYS.items():
        if key not in d:
            raise UserError(
                f"{where} is missing required key '{key}' ({meaning}); "
                f"required keys: {', '.join(_REQUIRED_KEYS)}"
            )

    gamma = _check_gamma(d["gamma"], f"{where}.gamma", continuing=False)

    name = f"{where}.transitions"
    transitions = _to_array(d["transitions"], name, "[S][A][S]", ndim=3)
    num_states, num_actions, num_next = transitions.shape
    if num_states == 0 or num_actions == 0:
        raise UserError(f"{name} must have at least one state and one action")
    if num_next != num_states:
        raise UserError(
            f"{name}[0][0] has {num_next} next-state probabilities, "
            f"expected one per state ({num_states})"
        )
    transitions = _check_distributions(transitions, name)

    rewards = _to_array(d["rewards"], f"{where}.rewards", "[S][A]", ndim=2)
    _check_rows(rewards, f"{where}.rewards", num_states, "state")
    _check_cols(rewards, f"{where}.rewards", num_actions, "action")

    if d.get("terminal") is None:
        terminal = np.zeros(num_states, dtype=bool)
    else:
        terminal = _to_terminal(d["terminal"], f"{where}.terminal", num_states)

    start = _to_array(d["start"], f"{where}.start", "[S]", ndim=1)
    _check_rows(start, f"{where}.start", num_states, "state", unit="entries")
    start = _check_distributions(start, f"{where}.start")
    if np.any(start[terminal] > 0):
        s = int(np.flatnonzero(terminal & (start > 0))[0])
        raise UserError(
            f"{where}.start[{s}] is {start[s]:.6g} but state {s} is terminal; "
            "episodes must start in non-terminal states"
        )

    features = _to_array(d["features"], f"{where}.features", "[S][d]", ndim=(1, 2))
    if features.ndim == 1:  # one scalar feature per state
        features = features[:, None]
    _check_rows(features, f"{where}.features", num_states, "state")
    if features.shape[1] == 0:
        raise UserError(f"{where}.features must have at least one feature per state")
    num_features = features.shape[1]

    behavior = _policy(d["behavior_policy"], f"{where}.behavior_policy", num_states, num_actions)
    if d.get("target_policy") is None:
        target = behavior.copy()
    else:
        target = _policy(d["target_policy"], f"{where}.target_policy", num_states, num_actions)

    uncovered = (target > 0) & (behavior == 0) & ~terminal[:, None]
    if np.any(uncovered):
        s, a = (int(i) for i in np.argwhere(uncovered)[0])
        raise UserError(
            f"{where}.target_policy[{s}][{a}] is {target[s, a]:.6g} but "
            f"behavior_policy[{s}][{a}] is 0; off-policy TD needs coverage "
            "(behavior_policy > 0 wherever target_policy > 0)"
        )

    if d.get("initial_weights") is None:
        initial_weights = np.zeros(num_features)
    else:
        name = f"{where}.initial_weights"
        initial_weights = _to_array(d["initial_weights"], name, "[d]", ndim=1)
        _check_rows(initial_weights, name, num_features, "feature", unit="entries")

    mdp = FiniteMDP(
        transitions=transitions,
        rewards=rewards,
        terminal=terminal,
        start=start,
        features=features,
        behavior_policy=behavior,
        target_policy=target,
        gamma=gamma,
        initial_weights=initial_weights,
        name="finite_mdp",
    )
    if gamma == 1.0:
        stuck = _never_terminates(mdp)
        if stuck is not None:
            what = (
                "there are no terminal states"
                if not terminal.any()
                else f"under target_policy state {stuck} never reaches a terminal state"
            )
            raise UserError(
                f"{where}.gamma is 1 but {what}, so v_pi is undefined; "
                "set gamma < 1 or give every state a path to a terminal state"
            )
    return mdp


def make_mdp(env_id: str, mdp_dict: Mapping | None = None) -> FiniteMDP:
    """The MDP named by ``env.id``: ``baird``, ``two_state`` or ``finite_mdp``.

    For ``finite_mdp``, ``mdp_dict`` (``env.mdp``) is the MDP itself, see :func:`from_dict`.
    For ``baird`` and ``two_state`` it may be absent, or may set ``gamma``.
    """
    mdp_dict = _to_plain(mdp_dict)
    if env_id == "finite_mdp":
        if mdp_dict is None:
            raise UserError(
                "env.id=finite_mdp needs env.mdp: a mapping with keys " + ", ".join(MDP_KEYS)
            )
        return from_dict(mdp_dict)
    builders = {"baird": baird, "two_state": two_state}
    if env_id not in builders:
        close = difflib.get_close_matches(str(env_id), ENV_IDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"env.id '{env_id}' is not a finite MDP{hint}; valid: {', '.join(ENV_IDS)}"
        )
    kwargs = dict(mdp_dict or {})
    for key in kwargs:
        if key != "gamma":
            raise UserError(
                f"env.mdp has key '{key}', but for env.id={env_id} only 'gamma' may be set; "
                "use env.id=finite_mdp to give a whole MDP"
            )
    if "gamma" in kwargs:
        kwargs["gamma"] = _check_gamma(kwargs["gamma"], "env.mdp.gamma", continuing=True)
    return builders[env_id](**kwargs)


# --------------------------------------------------------------------------------------------
# Exact analysis (host side, numpy float64)
# --------------------------------------------------------------------------------------------


def policy_transition_matrix(mdp: FiniteMDP, policy) -> np.ndarray:
    """P_policy[s, s'] = sum_a policy(a|s) P(s'|s, a), float64 [S, S]."""
    return np.einsum("sa,sat->st", _f64(policy), _f64(mdp.transitions))


def true_values(mdp: FiniteMDP) -> np.ndarray:
    """v_pi [S], float64: the target policy's expected discounted return from each state.

    Solves (I - gamma P_pi) v = r_pi on the non-terminal states, with v = 0 on terminal states
    and no bootstrapping out of them (an episode ends on entering one).
    """
    pi = _f64(mdp.target_policy)
    live = ~np.asarray(mdp.terminal, dtype=bool)
    p_pi = policy_transition_matrix(mdp, pi)[np.ix_(live, live)]
    r_pi = np.sum(pi * _f64(mdp.rewards), axis=1)[live]
    gamma = float(mdp.gamma)
    v = np.zeros(mdp.num_states)
    try:
        v[live] = np.linalg.solve(np.eye(int(live.sum())) - gamma * p_pi, r_pi)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"v_pi of {mdp.name} is undefined: gamma = {gamma} and the target policy does not "
            "terminate from every state"
        ) from None
    return v


def restart_transition_matrix(mdp: FiniteMDP, policy=None) -> np.ndarray:
    """The state chain the sampler follows under ``policy`` (default: behaviour), [S, S].

    Entering a terminal state is replaced by a fresh draw from ``start`` (the stream never sits in
    a terminal state); rows of terminal states are ``start`` too.
    """
    policy = mdp.behavior_policy if policy is None else policy
    terminal = np.asarray(mdp.terminal, dtype=bool)
    start = _f64(mdp.start)
    p = policy_transition_matrix(mdp, policy)
    restart = p[:, terminal].sum(axis=1)
    p = p * ~terminal[None, :] + restart[:, None] * start[None, :]
    p[terminal] = start
    return p


def behavior_state_distribution(mdp: FiniteMDP) -> np.ndarray:
    """mu [S], float64: the on-policy distribution of the behaviour policy, restarts included.

    The long-run fraction of time the sampler's stream (``reset`` then ``step`` following
    ``continue_state``) spends in each state. For an episodic MDP this is S&B's on-policy
    distribution (eq. 9.2/9.3: expected visits per episode, normalised); terminal states get 0.
    When the chain has one recurrent class it is its stationary distribution; otherwise it is the
    Cesaro limit from ``start``, mu^T = start^T P*, with P* the projection onto the eigenvalue-1
    eigenspace of the chain (eigenvalue 1 of a stochastic matrix is semisimple).
    """
    p = restart_transition_matrix(mdp)
    n = p.shape[0]
    u, sing, vh = np.linalg.svd(np.eye(n) - p)
    k = max(1, int(np.sum(sing <= 1e-10 * max(1.0, sing[0]))))
    right = vh[-k:].T  # (I - P) V = 0
    left = u[:, -k:]  # W^T (I - P) = 0
    mu = _f64(mdp.start) @ right @ np.linalg.solve(left.T @ right, left.T)
    mu = np.clip(mu, 0.0, None)
    return mu / mu.sum()


def expected_td_matrix(mdp: FiniteMDP) -> tuple[np.ndarray, np.ndarray]:
    """(A [d, d], b [d]) of the expected off-policy semi-gradient TD(0) update, float64.

    The sampled update (S&B eq. 11.2) is w <- w + alpha rho_t delta_t x(S_t) with
    delta_t = R_{t+1} + gamma (1 - terminated) x(S_{t+1}).w - x(S_t).w. Taking its expectation
    with S_t ~ mu (:func:`behavior_state_distribution`), A_t ~ b and rho = pi/b folded in (so
    next states are under the target policy) gives w <- w + alpha (b - A w) with

        A = X^T D_mu (X - gamma P_pi X),   b = X^T D_mu r_pi,

    where P_pi has the columns of terminal states zeroed (nothing bootstraps out of them).
    Where b does not cover pi (pi(a|s) > 0, b(a|s) = 0; e.g. :func:`two_state`), those actions
    are never sampled, so pi is replaced by b * rho (pi restricted to b's support) and the
    ``X`` term is weighted by the retained mass; with coverage this is exactly the formula above.
    The iteration w <- (I - alpha A) w + alpha b diverges for every small alpha > 0 when A has
    an eigenvalue with negative real part (|1 - alpha lambda| > 1), as on Baird's example.
    """
    x = _f64(mdp.features)
    mu = behavior_state_distribution(mdp)
    pi_eff = _f64(mdp.behavior_policy) * importance_ratios(mdp)
    live = ~np.asarray(mdp.terminal, dtype=bool)
    p_pi = policy_transition_matrix(mdp, pi_eff) * live[None, :]
    r_pi = np.sum(pi_eff * _f64(mdp.rewards), axis=1)
    mass = pi_eff.sum(axis=1)
    xd = x.T * mu[None, :]
    a = xd @ (mass[:, None] * x - float(mdp.gamma) * p_pi @ x)
    return a, xd @ r_pi


def td_fixed_point(mdp: FiniteMDP) -> np.ndarray:
    """w_TD [d], float64: the solution of A w = b (:func:`expected_td_matrix`).

    Least squares (minimum norm) where A is singular, as on Baird's example (8 features,
    7 states), whose fixed points are the whole null space of A (all with v = 0).
    """
    a, b = expected_td_matrix(mdp)
    if np.linalg.matrix_rank(a) == a.shape[0]:
        return np.linalg.solve(a, b)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def importance_ratios(mdp: FiniteMDP) -> np.ndarray:
    """rho[S, A] = pi(a|s) / b(a|s), float64; 0 where b(a|s) = 0 (never sampled)."""
    b = _f64(mdp.behavior_policy)
    pi = _f64(mdp.target_policy)
    return np.divide(pi, b, out=np.zeros_like(pi), where=b > 0)


# --------------------------------------------------------------------------------------------
# JAX sampling
# --------------------------------------------------------------------------------------------


def reset(mdp: FiniteMDP, key: jax.Array) -> jax.Array:
    """A start state s_0 ~ start, int32 scalar. Pure; jit/vmap friendly."""
    start = jnp.asarray(mdp.start)
    return jax.random.categorical(key, jnp.log(start)).astype(jnp.int32)


def step(mdp: FiniteMDP, key: jax.Array, s: jax.Array) -> Transition:
    """One step from non-terminal state ``s``: a ~ b(s), s' ~ P[s, a], r = R[s, a].

    Returns a :class:`Transition` with rho = pi(a|s)/b(a|s) and ``terminated`` = terminal[s'].
    ``next_state`` is the true s' (bootstrap from it, discounted by gamma (1 - terminated));
    ``continue_state`` is s', or a fresh start state when s' is terminal -- the ``s`` to pass
    next. Both draws are always made (no branching), so the function vmaps without cond.
    """
    s = jnp.asarray(s, dtype=jnp.int32)
    key_action, key_next, key_restart = jax.random.split(key, 3)
    b = jnp.asarray(mdp.behavior_policy)[s]
    pi = jnp.asarray(mdp.target_policy)[s]
    a = jax.random.categorical(key_action, jnp.log(b)).astype(jnp.int32)
    p_next = jnp.asarray(mdp.transitions)[s, a]
    s_next = jax.random.categorical(key_next, jnp.log(p_next)).astype(jnp.int32)
    terminated = jnp.asarray(mdp.terminal)[s_next]
    b_a = b[a]
    rho = jnp.where(b_a > 0, pi[a] / jnp.where(b_a > 0, b_a, 1.0), 0.0)
    continue_state = jnp.where(terminated, reset(mdp, key_restart), s_next)
    return Transition(
        state=s,
        action=a,
        reward=jnp.asarray(mdp.rewards)[s, a],
        next_state=s_next,
        terminated=terminated,
        rho=rho,
        continue_state=continue_state,
    )


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _to_plain(d):
    """OmegaConf containers -> plain Python; anything else unchanged."""
    if d is not None and type(d).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(d, resolve=True)
    return d


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


def _check_gamma(gamma, name: str, *, continuing: bool) -> float:
    if not _is_number(gamma) or not np.isfinite(gamma):
        raise UserError(f"{name} is {gamma!r}, must be a number in [0, 1]")
    if continuing and not 0.0 <= gamma < 1.0:
        raise UserError(f"{name} is {gamma}, must be in [0, 1) for this continuing MDP")
    if not 0.0 <= gamma <= 1.0:
        raise UserError(f"{name} is {gamma}, must be in [0, 1]")
    return float(gamma)


def _index(where: str, idx) -> str:
    return where + "".join(f"[{int(i)}]" for i in idx)


def _check_nested(value, where: str) -> None:
    """Raises UserError at the first entry that makes ``value`` ragged or non-numeric."""
    if isinstance(value, np.ndarray):
        return
    if isinstance(value, (list, tuple)):
        kinds = [isinstance(v, (list, tuple, np.ndarray)) for v in value]
        if any(kinds) and not all(kinds):
            i = kinds.index(not kinds[0])
            raise UserError(
                f"{where}[{i}] and {where}[0] differ: one is a list, the other a number; "
                "every row must have the same shape"
            )
        if all(kinds) and value:
            n = len(value[0])
            for i, v in enumerate(value):
                if len(v) != n:
                    raise UserError(
                        f"{where}[{i}] has {len(v)} entries but {where}[0] has {n}; "
                        "every row must have the same length"
                    )
        for i, v in enumerate(value):
            _check_nested(v, f"{where}[{i}]")
        return
    if not _is_number(value):
        raise UserError(f"{where} is {value!r}, expected a number")


def _to_array(value, where: str, shape: str, *, ndim) -> np.ndarray:
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise UserError(f"{where} must be a nested list of shape {shape}, got {value!r}")
    _check_nested(value, where)
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise UserError(f"{where} must contain numbers, got {arr.dtype} values")
    arr = arr.astype(np.float64)
    if arr.ndim not in ndims:
        got = "[" + "][".join(str(n) for n in arr.shape) + "]"
        raise UserError(f"{where} has shape {got}, expected {shape}")
    bad = ~np.isfinite(arr)
    if np.any(bad):
        idx = np.argwhere(bad)[0]
        raise UserError(f"{_index(where, idx)} is {arr[tuple(idx)]}, must be finite")
    return arr


def _check_rows(arr, where: str, n: int, per: str, *, unit: str = "rows") -> None:
    if arr.shape[0] != n:
        raise UserError(f"{where} has {arr.shape[0]} {unit}, expected one per {per} ({n})")


def _check_cols(arr, where: str, n: int, per: str) -> None:
    if arr.shape[1] != n:
        raise UserError(f"{where}[0] has {arr.shape[1]} entries, expected one per {per} ({n})")


def _check_distributions(arr: np.ndarray, where: str) -> np.ndarray:
    """Checks that ``arr`` holds probability distributions along its last axis; renormalises."""
    negative = arr < 0
    if np.any(negative):
        idx = np.argwhere(negative)[0]
        raise UserError(
            f"{_index(where, idx)} is {arr[tuple(idx)]:.6g}, probabilities must be >= 0"
        )
    sums = arr.sum(axis=-1, keepdims=True)
    bad = np.abs(sums[..., 0] - 1.0) > _PROB_ATOL
    if np.any(bad):
        idx = tuple(np.argwhere(bad)[0])
        total = float(sums[..., 0][idx])
        raise UserError(f"{_index(where, idx)} sums to {total:.6g}, must sum to 1")
    return arr / sums


def _policy(value, where: str, num_states: int, num_actions: int) -> np.ndarray:
    arr = _to_array(value, where, "[S][A]", ndim=2)
    _check_rows(arr, where, num_states, "state")
    _check_cols(arr, where, num_actions, "action")
    return _check_distributions(arr, where)


def _to_terminal(value, where: str, num_states: int) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise UserError(f"{where} must be a list of {num_states} booleans, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, (bool, np.bool_)) or (_is_number(v) and v in (0, 1)):
            out.append(bool(v))
        else:
            raise UserError(f"{where}[{i}] is {v!r}, expected true or false")
    arr = np.asarray(out, dtype=bool).reshape(-1)
    _check_rows(arr, where, num_states, "state", unit="entries")
    return arr


def _never_terminates(mdp: FiniteMDP) -> int | None:
    """A non-terminal state from which the target policy never reaches a terminal state."""
    terminal = np.asarray(mdp.terminal, dtype=bool)
    edges = policy_transition_matrix(mdp, mdp.target_policy) > 0
    reaches = terminal.copy()
    while True:
        grown = reaches | edges[:, reaches].any(axis=1)
        if (grown == reaches).all():
            break
        reaches = grown
    stuck = np.flatnonzero(~reaches)
    return int(stuck[0]) if stuck.size else None
