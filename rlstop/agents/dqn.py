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

The agent is pure functions over a flax.struct state: ``init``, ``act``, ``update``. The loops in
``rlstop.train`` call them (the jitted scan loop and the gymnasium host loop alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import optax

from rlstop import losses
from rlstop.agents.replay import Transition
from rlstop.errors import UserError
from rlstop.networks import ACTIVATIONS, QNetwork


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
    # switches
    stop_gradient_target: bool = True
    target_network: bool = True
    double_q: bool = False
    layer_norm: bool = False

    TRACED: ClassVar[tuple[str, ...]] = (
        "learning_rate", "gamma", "target_update_period", "target_tau",
        "epsilon_start", "epsilon_end", "epsilon_fraction",
        "stop_gradient_target", "target_network", "double_q",
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
    steps: jnp.ndarray  # env steps taken so far (all envs)


def hparams(cfg: DQNConfig) -> dict:
    """The traced values of a config, as a dict of scalars (vmapped over by sweeps)."""
    out = {}
    for k in DQNConfig.TRACED:
        v = getattr(cfg, k)
        out[k] = jnp.asarray(v, jnp.bool_ if isinstance(v, bool) else jnp.float32)
    return out


def _where_tree(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


class DQN:
    """Static pieces (network shapes, batch size) live on the object; values come in ``hp``."""

    def __init__(self, cfg: DQNConfig, obs_shape: tuple, num_actions: int):
        self.cfg = cfg
        self.num_actions = num_actions
        self.obs_shape = obs_shape
        self.network = QNetwork(num_actions, tuple(cfg.hidden_sizes), cfg.activation, cfg.layer_norm)

    def optimizer(self, hp) -> optax.GradientTransformation:
        adam = optax.adam(hp["learning_rate"])
        if self.cfg.max_grad_norm > 0:
            return optax.chain(optax.clip_by_global_norm(self.cfg.max_grad_norm), adam)
        return adam

    def init(self, key: jax.Array, hp) -> DQNState:
        params = self.network.init(key, jnp.zeros(self.obs_shape, jnp.float32))
        return DQNState(params, params, self.optimizer(hp).init(params), jnp.zeros((), jnp.int32))

    def epsilon(self, steps, hp, total_steps: int):
        frac = jnp.clip(steps / (hp["epsilon_fraction"] * total_steps), 0.0, 1.0)
        return hp["epsilon_start"] + frac * (hp["epsilon_end"] - hp["epsilon_start"])

    def act(self, params, obs: jnp.ndarray, key: jax.Array, epsilon) -> jnp.ndarray:
        """Epsilon-greedy actions for a batch of observations [N, *obs_shape] -> [N]."""
        q = self.network.apply(params, obs)
        greedy = jnp.argmax(q, axis=-1)
        k1, k2 = jax.random.split(key)
        explore = jax.random.uniform(k1, greedy.shape) < epsilon
        random = jax.random.randint(k2, greedy.shape, 0, self.num_actions)
        return jnp.where(explore, random, greedy)

    def loss(self, params, target_params, batch: Transition, hp):
        """Mean squared TD error over the batch, and metrics.

        Q(s', .) is computed by ``target_params`` when the target network is on, by the online
        ``params`` otherwise; in the latter case the gradient reaches the online parameters
        through the target unless ``stop_gradient_target`` detaches it.
        """
        bootstrap_params = _where_tree(hp["target_network"], jax.lax.stop_gradient(target_params), params)
        # One online forward pass over [s; s'] gives Q(s, .) and the double-Q selector Q(s', .).
        n = batch.obs.shape[0]
        q_online = self.network.apply(params, jnp.concatenate([batch.obs, batch.next_obs]))
        q_tm1, q_t_selector = q_online[:n], q_online[n:]
        q_t_value = self.network.apply(bootstrap_params, batch.next_obs)
        discount_t = hp["gamma"] * (1.0 - batch.terminated.astype(jnp.float32))
        sg = hp["stop_gradient_target"]
        td_q = jax.vmap(lambda *a: losses.q_learning(*a, stop_gradient=sg))(
            q_tm1, batch.action, batch.reward, discount_t, q_t_value)
        td_dq = jax.vmap(lambda *a: losses.double_q_learning(*a, stop_gradient=sg))(
            q_tm1, batch.action, batch.reward, discount_t, q_t_value, q_t_selector)
        td = jnp.where(hp["double_q"], td_dq, td_q)
        loss = jnp.mean(td**2)
        q_taken = jnp.take_along_axis(q_tm1, batch.action[:, None], axis=-1)
        metrics = {"q_mean": jnp.mean(q_taken), "q_max_abs": jnp.max(jnp.abs(q_tm1))}
        return loss, metrics

    def update(self, state: DQNState, batch: Transition, hp, env_steps_before) -> tuple[DQNState, dict]:
        """One gradient step, then a target sync if a multiple of target_update_period was crossed."""
        (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state.params, state.target_params, batch, hp)
        updates, opt_state = self.optimizer(hp).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        period = hp["target_update_period"]
        sync = jnp.floor(state.steps / period) > jnp.floor(env_steps_before / period)
        # Polyak step of size tau when a sync is due (tau = 1: hard copy), else unchanged.
        step = jnp.where(sync, hp["target_tau"], 0.0)
        target_params = jax.tree.map(lambda t, p: step * p + (1.0 - step) * t, state.target_params, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return state.replace(params=params, target_params=target_params, opt_state=opt_state), metrics
