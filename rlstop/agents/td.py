"""Linear TD(0) prediction on a finite MDP, off-policy, with the target's detach as a switch.

The value estimate is linear in the MDP's fixed features, v(s) = x(s) . w. The data come from the
behaviour policy b; the values learned are those of the target policy pi, through the per-step
importance-sampling ratio rho = pi(a|s) / b(a|s).

Every variant is plain gradient descent, ``w <- w - alpha * grad L(w)``, on a loss built from
:func:`rlstop.losses.td_learning` with ``stop_gradient=agent.stop_gradient_target``:

* ``update: sampled`` -- one transition (s, a, r, s') per update per chain,
  ``L(w) = mean over chains of 1/2 rho delta^2`` with
  ``delta = r + gamma (1 - terminated) x(s') . w_boot - x(s) . w``.
  With the target detached (semi-gradient) the step is exactly S&B (2nd ed.) eq. 11.2,
  ``w <- w + alpha rho delta x(s)``. Without the detach it is the residual gradient of the
  rho-weighted squared TD error (Baird 1995), ``w <- w + alpha rho delta (x(s) - gamma x(s'))``.
* ``update: expected`` -- the same loss, averaged exactly over (s, a, s') with s ~ mu (the
  behaviour policy's state distribution, :func:`rlstop.envs.mdp.behavior_state_distribution`),
  a ~ b(.|s), rho folded in, s' ~ P(.|s, a). With the target detached this is the expected (DP)
  TD update of S&B eq. 11.9, ``w <- w + alpha (b - A w)`` with ``(A, b)`` of
  :func:`rlstop.envs.mdp.expected_td_matrix`; on Baird's example it is the book's
  ``w <- w + (alpha / 7) sum_s (gamma x(7) . w - x(s) . w) x(s)``. Without the detach it is
  gradient descent on the mean squared TD error E_mu[rho delta^2] / 2 (S&B section 11.5).

Switches (traced: one compile serves every combination):

* ``stop_gradient_target`` -- the bootstrap r + gamma v(s') is detached (semi-gradient TD).
  Off: the gradient also flows through v(s') into the online weights (residual gradient).
* ``target_network`` -- v(s') is computed from target weights, copied from the online weights
  every ``target_update_period`` updates (off by default: textbook TD bootstraps from w itself).
  With it on, the residual gradient through v(s') lands on the frozen target weights, so the
  online step is the semi-gradient one whatever ``stop_gradient_target`` says.

The discount is the MDP's (``env.mdp.gamma``; Baird 0.99, two-state 0.9 unless set there): it
defines v_pi, the TD fixed point and the metrics, so it is part of the environment, not a free
hyperparameter. ``agent.gamma`` is null (= the MDP's); if set, it must equal the MDP's.

Dtypes follow JAX's default float: float32, or float64 under ``train.x64: true``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlstop import losses
from rlstop.envs import mdp as mdp_lib
from rlstop.envs import resolve_backend
from rlstop.errors import UserError

UPDATES = ("sampled", "expected")


@dataclass(frozen=True)
class TDConfig:
    kind: str = "td"
    update: str = "sampled"           # sampled | expected (static: a different program)
    learning_rate: float = 0.01
    gamma: Optional[float] = None     # null = the MDP's discount; if set, must equal it
    l2: float = 0.0                   # adds l2/2 ||w||^2 to the loss
    target_update_period: int = 1     # updates between target-weight syncs (target_network on)
    # switches
    stop_gradient_target: bool = True
    target_network: bool = False

    TRACED: ClassVar[tuple[str, ...]] = (
        "learning_rate", "l2", "target_update_period", "stop_gradient_target", "target_network",
    )
    SWITCHES: ClassVar[tuple[str, ...]] = ("stop_gradient_target", "target_network")

    def validate(self, cfg) -> None:
        def check(cond, msg):
            if not cond:
                raise UserError(msg)

        check(self.update in UPDATES, f"agent.update={self.update!r} is not one of {', '.join(UPDATES)}")
        check(self.learning_rate > 0, f"agent.learning_rate={self.learning_rate} must be positive")
        check(self.l2 >= 0, f"agent.l2={self.l2} must be >= 0 (0 = off)")
        check(self.target_update_period >= 1,
              f"agent.target_update_period={self.target_update_period} must be >= 1")
        check(resolve_backend(cfg.env) == "mdp",
              f"agent.kind=td needs a finite MDP: set env.id to one of {', '.join(mdp_lib.ENV_IDS)} "
              f"(got env.id={cfg.env.id!r}, env.backend={cfg.env.backend!r})")
        mdp = mdp_lib.make_mdp(cfg.env.id, cfg.env.mdp)  # UserError on a bad env.mdp
        if self.gamma is not None:
            check(abs(self.gamma - float(mdp.gamma)) <= 1e-12,
                  f"agent.gamma={self.gamma} disagrees with the MDP's gamma={float(mdp.gamma)}; the TD agent "
                  f"uses the MDP's discount: set env.mdp.gamma={self.gamma} instead and leave agent.gamma null")
        t = cfg.train
        if self.update == "expected":
            check(cfg.env.num_envs == 1,
                  f"env.num_envs={cfg.env.num_envs}: agent.update=expected samples nothing; set env.num_envs=1")
        else:
            check(t.log_every % cfg.env.num_envs == 0,
                  f"train.log_every={t.log_every} must be a multiple of env.num_envs={cfg.env.num_envs} "
                  "(one update consumes one transition per chain)")
        check(t.total_steps % t.log_every == 0,
              f"train.total_steps={t.total_steps} must be a multiple of train.log_every={t.log_every}")


def config_class(kind: str):
    return TDConfig


def _float():
    """JAX's default float dtype: float64 under x64, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def hparams(cfg: TDConfig) -> dict:
    """The traced values of a config, as a dict of scalars (vmapped over by sweeps)."""
    out = {}
    for k in TDConfig.TRACED:
        v = getattr(cfg, k)
        dtype = jnp.bool_ if isinstance(v, bool) else jnp.int32 if isinstance(v, int) else _float()
        out[k] = jnp.asarray(v, dtype)
    return out


@flax.struct.dataclass
class TDState:
    w: jax.Array          # [d] online weights
    target_w: jax.Array   # [d] target weights (used for the bootstrap when target_network is on)
    updates: jax.Array    # int32, updates made so far


class ExpectedModel:
    """The (s, a, s') triples with positive probability under mu x b x P, as host constants.

    ``weight[k] = mu(s) b(a|s) rho(s, a) P(s'|s, a)``: the expected update is the weighted sum of
    the sampled one over these triples (rho folded in, so the next states are pi's).
    """

    def __init__(self, mdp: mdp_lib.FiniteMDP):
        mu = mdp_lib.behavior_state_distribution(mdp)
        rho = mdp_lib.importance_ratios(mdp)
        b = np.asarray(mdp.behavior_policy, np.float64)
        p = np.asarray(mdp.transitions, np.float64)
        w = mu[:, None, None] * b[:, :, None] * rho[:, :, None] * p
        w[np.asarray(mdp.terminal, bool)] = 0.0  # nothing is updated in a terminal state
        s, a, s_next = np.nonzero(w > 0)
        self.state, self.action, self.next_state = s, a, s_next
        self.weight = w[s, a, s_next]
        self.reward = np.asarray(mdp.rewards, np.float64)[s, a]
        self.terminated = np.asarray(mdp.terminal, bool)[s_next]


class TD:
    """Static pieces (features, discount, the expected model) live on the object; values in ``hp``.

    Arrays are converted to JAX's default float dtype when the object is built, so build it after
    enabling x64 if you want float64.
    """

    def __init__(self, cfg: TDConfig, mdp: mdp_lib.FiniteMDP):
        self.cfg = cfg
        self.mdp = mdp                                   # host (numpy float64) copy
        f = _float()
        self.features = jnp.asarray(mdp.features, f)    # [S, d]
        self.terminal = jnp.asarray(mdp.terminal)       # [S]
        self.gamma = float(mdp.gamma)
        self.initial_weights = jnp.asarray(mdp.initial_weights, f)
        self.expected = ExpectedModel(mdp) if cfg.update == "expected" else None

    def init(self) -> TDState:
        w = self.initial_weights
        return TDState(w, w, jnp.zeros((), jnp.int32))

    def values(self, w) -> jax.Array:
        """v(s) = x(s) . w for every state, 0 on terminal states (their value by definition)."""
        return jnp.where(self.terminal, 0.0, self.features @ w)

    def td_errors(self, w, w_boot, s, r, terminated, s_next, hp) -> jax.Array:
        """delta = r + gamma (1 - terminated) x(s') . w_boot - x(s) . w, for a batch [N].

        ``w`` values the state the update is made in, ``w_boot`` the next state. The losses pass
        the same (online) weights to both unless the target network is on; keeping them separate
        arguments lets tests differentiate through the bootstrap alone.
        """
        x = self.features
        v_tm1 = x[s] @ w
        v_t = x[s_next] @ w_boot
        discount_t = self.gamma * (1.0 - terminated.astype(v_tm1.dtype))
        sg = hp["stop_gradient_target"]
        return jax.vmap(lambda *args: losses.td_learning(*args, stop_gradient=sg))(
            v_tm1, r.astype(v_tm1.dtype), discount_t, v_t)

    def bootstrap_weights(self, w, target_w, hp):
        return jnp.where(hp["target_network"], jax.lax.stop_gradient(target_w), w)

    def sampled_loss(self, w, target_w, batch: mdp_lib.Transition, hp):
        """mean over the batch of rho delta^2 / 2 (+ l2/2 ||w||^2); batch fields are [N]."""
        w_boot = self.bootstrap_weights(w, target_w, hp)
        delta = self.td_errors(w, w_boot, batch.state, batch.reward, batch.terminated, batch.next_state, hp)
        td_loss = jnp.mean(0.5 * batch.rho.astype(delta.dtype) * delta**2)
        return td_loss + 0.5 * hp["l2"] * jnp.sum(w**2), td_loss

    def expected_loss(self, w, target_w, hp):
        """sum over (s, a, s') of mu b rho P delta^2 / 2 (+ l2/2 ||w||^2), exactly."""
        m = self.expected
        w_boot = self.bootstrap_weights(w, target_w, hp)
        delta = self.td_errors(w, w_boot, jnp.asarray(m.state), jnp.asarray(m.reward), jnp.asarray(m.terminated),
                               jnp.asarray(m.next_state), hp)
        td_loss = jnp.sum(jnp.asarray(m.weight, delta.dtype) * 0.5 * delta**2)
        return td_loss + 0.5 * hp["l2"] * jnp.sum(w**2), td_loss

    def loss(self, w, target_w, batch, hp):
        if self.cfg.update == "expected":  # static
            return self.expected_loss(w, target_w, hp)
        return self.sampled_loss(w, target_w, batch, hp)

    def update(self, state: TDState, batch, hp) -> tuple[TDState, dict]:
        """One step w <- w - alpha grad L(w), then a target sync every target_update_period updates.

        ``batch`` is a :class:`rlstop.envs.mdp.Transition` of [N] fields (sampled) or None (expected).
        """
        (_, td_loss), grad = jax.value_and_grad(self.loss, has_aux=True)(state.w, state.target_w, batch, hp)
        w = state.w - hp["learning_rate"] * grad
        updates = state.updates + 1
        target_w = jnp.where(updates % hp["target_update_period"] == 0, w, state.target_w)
        metrics = {"loss": td_loss, "value_max_abs": jnp.max(jnp.abs(self.values(w)))}
        return TDState(w, target_w, updates), metrics
