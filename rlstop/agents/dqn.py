"""Deep Q-learning (Mnih et al. 2015) with every detach as a switch.

Switches (traced: one compile serves every combination):

* ``stop_gradient_target`` -- the bootstrapped target r + gamma * max_a Q(s', a) is detached
  (semi-gradient). Off: the gradient of the squared TD error also flows through Q(s', .) into
  whatever parameters compute it (the residual gradient of Baird 1995).
* ``target_network`` -- Q(s', .) comes from target parameters, synced every
  ``target_update_period`` env steps with step size ``target_tau`` (1 = hard copy). Off: Q(s', .)
  comes from the online parameters.
* ``double_q`` -- the target action is chosen by the online network and valued by the target
  network (van Hasselt et al. 2016).

``layer_norm`` changes the parameters' shapes and is static.

The optimizer (``agent.optimizer``: adam, adamw, sgd) is built by ``rlstop.agents.optim``;
``agent.freeze`` / ``agent.freeze_mode`` freeze parameter sub-trees (``torso``, ``head``) and
``agent.init_from`` starts from an earlier run's parameters (``rlstop.agents.freeze``).

The agent is pure functions over a flax.struct state: ``init``, ``act``, ``update``. The loops in
``rlstop.train`` call them (the jitted scan loop and the gymnasium host loop alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from rlstop import losses
from rlstop.agents import freeze, optim
from rlstop.agents.replay import Transition
from rlstop.errors import UserError
from rlstop.networks import ACTIVATIONS, QNetwork, lecun_normal_init


@dataclass(frozen=True)
class DQNConfig:
    kind: str = "dqn"
    learning_rate: float = 2.5e-4
    gamma: float = 0.99
    batch_size: int = 128
    hidden_sizes: list[int] = field(default_factory=lambda: [120, 84])
    activation: str = "relu"
    buffer_size: int = 10_000
    learning_starts: int = 10_000   # env steps before the first update
    train_every: int = 10           # env steps (per env) between gradient updates
    target_update_period: int = 500  # env steps between target syncs
    target_tau: float = 1.0          # 1 = hard copy; < 1 = Polyak averaging at each sync
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_fraction: float = 0.5    # of train.total_steps
    max_grad_norm: float = 0.0       # 0 = no clipping (static: it adds ops to every update)
    optimizer: str = "adam"          # adam | adamw | sgd (rlstop.agents.optim)
    weight_decay: float = 0.0        # adamw: decoupled weight decay
    momentum: float = 0.0            # sgd: heavy-ball momentum
    # frozen sub-trees and initialisation from another run (rlstop.agents.freeze)
    freeze: list[str] = field(default_factory=list)  # e.g. [torso]
    freeze_mode: str = "mask"        # mask (through the optimizer) | stop_gradient (in the loss)
    init_from: Optional[str] = None  # a finished run's folder
    init_params: Optional[list[str]] = None  # the sub-trees init_from loads; null = all
    # switches
    stop_gradient_target: bool = True
    target_network: bool = True
    double_q: bool = False
    layer_norm: bool = False

    TRACED: ClassVar[tuple[str, ...]] = (
        "learning_rate", "gamma", "target_update_period", "target_tau",
        "epsilon_start", "epsilon_end", "epsilon_fraction",
        "stop_gradient_target", "target_network", "double_q",
        "weight_decay", "momentum",
    )
    SWITCHES: ClassVar[tuple[str, ...]] = ("stop_gradient_target", "target_network", "double_q", "layer_norm")

    def validate(self, cfg) -> None:
        def check(cond, msg):
            if not cond:
                raise UserError(msg)

        check(self.learning_rate > 0, f"agent.learning_rate={self.learning_rate} must be positive")
        check(0.0 <= self.gamma <= 1.0, f"agent.gamma={self.gamma} must be in [0, 1]")
        check(self.batch_size >= 1, f"agent.batch_size={self.batch_size} must be >= 1")
        check(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
              f"agent.hidden_sizes={list(self.hidden_sizes)} must be a non-empty list of positive sizes")
        check(self.activation in ACTIVATIONS,
              f"agent.activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        check(self.buffer_size >= self.batch_size,
              f"agent.buffer_size={self.buffer_size} must be >= agent.batch_size={self.batch_size}")
        check(self.learning_starts >= 0, f"agent.learning_starts={self.learning_starts} must be >= 0")
        check(self.train_every >= 1, f"agent.train_every={self.train_every} must be >= 1")
        check(self.target_update_period >= 1, f"agent.target_update_period={self.target_update_period} must be >= 1")
        check(0.0 < self.target_tau <= 1.0, f"agent.target_tau={self.target_tau} must be in (0, 1]")
        check(0.0 <= self.epsilon_end <= 1.0 and 0.0 <= self.epsilon_start <= 1.0,
              "agent.epsilon_start and agent.epsilon_end must be in [0, 1]")
        check(0.0 < self.epsilon_fraction <= 1.0, f"agent.epsilon_fraction={self.epsilon_fraction} must be in (0, 1]")
        check(self.max_grad_norm >= 0, f"agent.max_grad_norm={self.max_grad_norm} must be >= 0 (0 = off)")
        optim.validate(self)
        freeze.validate(self, cfg)
        steps_per_iter = self.train_every * cfg.env.num_envs
        check(cfg.train.log_every % steps_per_iter == 0,
              f"train.log_every={cfg.train.log_every} must be a multiple of agent.train_every * env.num_envs "
              f"= {steps_per_iter}")


def config_class(kind: str):
    return DQNConfig


@flax.struct.dataclass
class DQNState:
    params: flax.core.FrozenDict
    target_params: flax.core.FrozenDict
    opt_state: optax.OptState


def hparams(cfg: DQNConfig) -> dict:
    """The traced values of a config, as a dict of scalars (vmapped over by sweeps)."""
    out = {}
    for k in DQNConfig.TRACED:
        v = getattr(cfg, k)
        out[k] = jnp.asarray(v, jnp.bool_ if isinstance(v, bool) else jnp.float32)
    return out


def _where_tree(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def switch(varying: bool, pred, true_fn, false_fn):
    """Choose between two computations by a traced boolean.

    When the boolean is the same for the whole batch (``varying`` False), ``lax.cond`` runs only
    the branch taken. When it varies across a vmapped batch, cond would turn into a select that
    runs both branches anyway; then both are computed and combined with ``jnp.where``.
    """
    if varying:
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(), false_fn())
    return jax.lax.cond(pred, true_fn, false_fn)


def masked_vjp(fn, needs, x, aux, ct, chunk: int | None = None):
    """``needs ? vjp(fn(., aux), x)(ct) : 0``: the cotangent of ``x`` through ``fn``, or exact zeros.

    Unbatched, a ``lax.cond`` runs only the branch taken. Under ``vmap`` with ``needs`` varying
    across the batch, a select would compute the VJP for every row; instead the rows go through
    a ``lax.map`` in chunks of ``chunk`` rows, and a chunk where no row needs the VJP skips it (a
    real cond). A sweep lays out its rows run by run, so the rows that need it are contiguous and
    most chunks skip. The default chunk is a few rows on CPU, where the loop costs little, and the
    whole batch on an accelerator, where each loop step has a fixed cost and batches are cheap.
    """
    def vjp(x, aux, ct):
        return jax.vjp(lambda v: fn(v, aux), x)[1](ct)[0]

    @jax.custom_batching.custom_vmap
    def one(needs, x, aux, ct):
        return jax.lax.cond(needs, lambda: vjp(x, aux, ct), lambda: jax.tree.map(jnp.zeros_like, x))

    @one.def_vmap
    def batched(axis_size, in_batched, needs, x, aux, ct):
        needs, x, aux, ct = jax.tree.map(
            lambda v, b: v if b else jnp.broadcast_to(v, (axis_size,) + jnp.shape(v)),
            (needs, x, aux, ct), tuple(in_batched))
        size = chunk or (_cpu_chunk(axis_size) if jax.default_backend() == "cpu" else axis_size)

        def rows(needs, x, aux, ct):
            def compute():
                g = jax.vmap(vjp)(x, aux, ct)
                return jax.tree.map(lambda v: jnp.where(needs.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0.0), g)

            return jax.lax.cond(jnp.any(needs), compute, lambda: jax.tree.map(jnp.zeros_like, x))

        chunks = jax.tree.map(lambda v: v.reshape((axis_size // size, size) + v.shape[1:]), (needs, x, aux, ct))
        out = jax.lax.map(lambda c: rows(*c), chunks)
        out = jax.tree.map(lambda v: v.reshape((axis_size,) + v.shape[2:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return one(needs, x, aux, ct)


def _cpu_chunk(n: int, target: int = 4) -> int:
    """Chunks of about ``target`` rows that tile a batch of n exactly: the smallest divisor of n
    that is at least ``target`` (n itself when there is none)."""
    return next(d for d in range(min(target, n), n + 1) if n % d == 0)


class DQN:
    """Static pieces (network shapes, batch size) live on the object; values come in ``hp``.

    ``varying`` names the traced values that differ across the vmapped batch (a sweep over
    switches); the others are shared, so branches on them are real ``lax.cond``s.
    """

    def __init__(self, cfg: DQNConfig, obs_shape: tuple, num_actions: int, varying: frozenset = frozenset()):
        self.cfg = cfg
        self.num_actions = num_actions
        self.obs_shape = obs_shape
        self.varying = frozenset(varying)
        self.network = QNetwork(num_actions, tuple(cfg.hidden_sizes), cfg.activation, cfg.layer_norm)
        # Frozen sub-trees (static): masked in the optimizer, or detached in the loss.
        self.frozen = tuple(cfg.freeze)
        self.mask = bool(self.frozen) and cfg.freeze_mode == "mask"
        self.detached = self.frozen if cfg.freeze_mode == "stop_gradient" else ()
        if self.frozen or cfg.init_params:
            shapes = jax.eval_shape(self.network.init, jax.random.PRNGKey(0), jnp.zeros(obs_shape, jnp.float32))
            freeze.check_names(self.frozen, shapes, "agent.freeze")
            freeze.check_names(cfg.init_params, shapes, "agent.init_params")

    def optimizer(self, hp) -> optax.GradientTransformation:
        """``agent.optimizer`` (Adam by default) with the static ``max_grad_norm`` clipping; with
        ``freeze_mode: mask``, a zero update for the frozen sub-trees."""
        labels = (lambda params: freeze.labels(params, self.frozen)) if self.mask else None
        return optim.build(self.cfg, hp, hp["learning_rate"], max_grad_norm=self.cfg.max_grad_norm, labels=labels)

    def init(self, key: jax.Array, hp) -> DQNState:
        params = lecun_normal_init(self.network, key, jnp.zeros(self.obs_shape, jnp.float32))
        return DQNState(params, params, self.optimizer(hp).init(params))

    def epsilon(self, step, hp, total_steps: int):
        """Linear decay from epsilon_start to epsilon_end over epsilon_fraction of the run (CleanRL)."""
        frac = jnp.clip(step / (hp["epsilon_fraction"] * total_steps), 0.0, 1.0)
        return hp["epsilon_start"] + frac * (hp["epsilon_end"] - hp["epsilon_start"])

    def act(self, params, obs: jnp.ndarray, key: jax.Array, epsilon) -> jnp.ndarray:
        """Epsilon-greedy actions for a batch of observations [N, *obs_shape] -> [N].

        One uniform draw u per env decides both: explore when u < epsilon, and then
        floor(u / epsilon * A) is uniform over the actions.
        """
        return self.act_with_uniform(params, obs, jax.random.uniform(key, obs.shape[:1]), epsilon)

    def act_with_uniform(self, params, obs: jnp.ndarray, u: jnp.ndarray, epsilon) -> jnp.ndarray:
        """``act`` with the uniform draws given (a loop may draw a whole iteration's at once)."""
        explore, random = self.explore(u, epsilon)
        greedy = self.greedy(params, obs)
        return jnp.where(explore, random.astype(greedy.dtype), greedy)

    def greedy(self, params, obs: jnp.ndarray) -> jnp.ndarray:
        """argmax_a Q(obs, a) for a batch of observations [N, *obs_shape] -> [N]."""
        return jnp.argmax(self.network.apply(params, obs), axis=-1)

    def explore(self, u: jnp.ndarray, epsilon):
        """The exploring half of epsilon-greedy from uniform draws u [N]: (explore [N] bool, random
        action [N] int32). Explore where u < epsilon; floor(u / epsilon * A) is then uniform over
        the A actions. It needs no parameters, so a host loop can skip the network entirely on a
        step where every env explores."""
        scaled = jnp.where(epsilon > 0, u / jnp.maximum(epsilon, 1e-12), 0.0)
        random = jnp.minimum((scaled * self.num_actions).astype(jnp.int32), self.num_actions - 1)
        return u < epsilon, random

    def _td(self, q_tm1, q_t_value, q_t_selector, batch: Transition, hp):
        """TD errors of the (double) Q-learning target; the selector is Q(s', .) of whichever
        network picks the bootstrap action. With the selector equal to q_t_value, the double-Q
        target is exactly the max target, so one code path serves both."""
        discount_t = hp["gamma"] * (1.0 - batch.terminated.astype(q_tm1.dtype))
        sg = hp["stop_gradient_target"]
        return jax.vmap(lambda *a: losses.double_q_learning(*a, stop_gradient=sg))(
            q_tm1, batch.action, batch.reward, discount_t, q_t_value, q_t_selector)

    def _selector(self, params, q_t_value, batch: Transition, hp):
        """Online Q(s', .) for double Q-learning, else the bootstrap values themselves (max target)."""
        def online():
            return jax.lax.stop_gradient(self.network.apply(params, batch.next_obs))

        def own():
            return jax.lax.stop_gradient(q_t_value)

        return switch("double_q" in self.varying, hp["double_q"], online, own)

    def _bootstrap_params(self, params, target_params, hp):
        return _where_tree(hp["target_network"], jax.lax.stop_gradient(target_params), params)

    def loss(self, params, target_params, batch: Transition, hp):
        """Mean squared TD error over the batch, and metrics: the loss as one differentiable function.

        Q(s', .) comes from ``target_params`` when the target network is on, from the online
        ``params`` otherwise; in the latter case the gradient reaches the online parameters
        through the target unless ``stop_gradient_target`` detaches it (the residual gradient).
        ``update`` computes exactly the gradient of this function, by the chain rule in two
        parts so that the part through the target costs nothing when it is zero.
        """
        params = freeze.detach(params, self.detached)
        q_tm1 = self.network.apply(params, batch.obs)
        q_t_value = self.network.apply(self._bootstrap_params(params, target_params, hp), batch.next_obs)
        td = self._td(q_tm1, q_t_value, self._selector(params, q_t_value, batch, hp), batch, hp)
        return jnp.mean(td**2), self._q_metrics(q_tm1, batch)

    def _q_metrics(self, q_tm1, batch):
        q_taken = jnp.take_along_axis(q_tm1, batch.action[:, None], axis=-1)
        return {"q_mean": jnp.mean(q_taken), "q_max_abs": jnp.max(jnp.abs(q_tm1))}

    def gradients(self, params, target_params, batch: Transition, hp):
        """(loss, metrics), d loss / d params -- equal to ``jax.value_and_grad(self.loss)``.

        dL/dθ = ∂L/∂θ through Q(s, a) + (∂Q(s', .)/∂θ)ᵀ ∂L/∂Q(s', .). The second term is
        non-zero only with the target network off (else Q(s', .) does not depend on θ) and the
        target not detached (else ∂L/∂Q(s', .) is exactly zero: the losses' stop_gradient
        switch). It is the vector-Jacobian product of the forward pass that gives Q(s', .), computed
        under a ``lax.cond`` when the switches are shared by the batch, and by ``masked_vjp`` (only
        for the chunks of rows that need it) when they vary across it.

        With ``freeze_mode: stop_gradient`` both parts read the frozen sub-trees through a
        stop-gradient, so their gradient is exactly zero.
        """
        bootstrap = self._bootstrap_params(params, target_params, hp)
        # One forward pass through Q(s', .) gives the bootstrap values and, linearised, the VJP of
        # the part through the target (needed only where bootstrap = params: target network off).
        q_t_value, vjp_next = jax.vjp(
            lambda p: self._q(p, batch.next_obs), bootstrap)
        selector = self._selector(params, q_t_value, batch, hp)

        def direct(p, q_next):
            q_tm1 = self._q(p, batch.obs)
            td = self._td(q_tm1, q_next, selector, batch, hp)
            return jnp.mean(td**2), self._q_metrics(q_tm1, batch)

        (loss, metrics), (g_direct, ct_next) = jax.value_and_grad(direct, argnums=(0, 1), has_aux=True)(
            params, q_t_value)

        needs = jnp.logical_not(hp["stop_gradient_target"]) & jnp.logical_not(hp["target_network"])
        if {"stop_gradient_target", "target_network"} & self.varying:
            g_target = self._residual(needs, params, batch.next_obs, ct_next)
        else:
            g_target = jax.lax.cond(needs, lambda: vjp_next(ct_next)[0], lambda: jax.tree.map(jnp.zeros_like, params))
        grads = jax.tree.map(jnp.add, g_direct, g_target)
        return (loss, metrics), grads

    def _residual(self, needs, params, next_obs, ct_next):
        """(∂Q(s', .)/∂θ)ᵀ ct_next where ``needs``, exactly zero elsewhere, for switches that vary
        across the batch: ``masked_vjp`` computes it only for the chunks of rows that need it."""
        return masked_vjp(self._q, needs, params, next_obs, ct_next)

    def _q(self, params, obs):
        """Q(obs, .), reading the frozen sub-trees through a stop-gradient with ``freeze_mode:
        stop_gradient`` (their gradient is then exactly zero)."""
        return self.network.apply(freeze.detach(params, self.detached), obs)

    def update(self, state: DQNState, batch: Transition, hp, sync) -> tuple[DQNState, dict]:
        """One gradient step, then (if ``sync``) a target step of size target_tau (1 = hard copy).

        With ``freeze_mode: mask`` the frozen sub-trees' gradients are dropped (``grad_norm`` and
        clipping see the trainable ones) and the optimizer gives them a zero update."""
        (loss, metrics), g = self.gradients(state.params, state.target_params, batch, hp)
        if self.mask:
            g = freeze.zero(g, self.frozen)
        updates, opt_state = self.optimizer(hp).update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        tau = hp["target_tau"]
        target_params = jax.lax.cond(
            sync, lambda: jax.tree.map(lambda t, p: tau * p + (1.0 - tau) * t, state.target_params, params),
            lambda: state.target_params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(g), **metrics}
        return DQNState(params, target_params, opt_state), metrics

    def q_stats(self, params, obs) -> dict:
        q = self.network.apply(params, obs)
        return {"q_mean": jnp.mean(jnp.max(q, axis=-1)), "q_max_abs": jnp.max(jnp.abs(q))}


def sync_due(steps_before, steps_after, period):
    """True when a multiple of ``period`` env steps lies in (steps_before, steps_after]."""
    return jnp.floor(steps_after / period) > jnp.floor(steps_before / period)
