"""Advantage actor-critic (A2C; Mnih et al. 2016) and PPO (Schulman et al. 2017) as one agent.

The two differ only in config: PPO takes several epochs of minibatch steps on each rollout with a
clipped surrogate (``clip_epsilon`` > 0) and, usually, a clipped value loss; A2C takes one step on
the whole rollout with the plain policy gradient ``-log pi(a|s) * A`` (``clip_epsilon`` = 0).

The critic's targets and the advantages are computed *inside* the differentiated loss, from the
current parameters, on whole rollout sequences: values of the observations and of the true next
observations come from one forward pass, lambda-returns are built from them with
``losses.lambda_returns``, and A = G - V(s). That is what makes the detaches below switchable
rather than an accident of where the target happened to be computed. Minibatches are therefore
groups of environments (each with its whole rollout), not shuffled single steps.

Switches (traced: one compile serves every combination):

* ``stop_gradient_target`` -- the lambda-return target G (the critic's target, and the bootstrap
  inside the advantage) is detached: semi-gradient TD(lambda). Off: the gradient of the critic
  loss also flows through the bootstrap values V(s') into the critic (residual gradient).
* ``target_network`` -- the bootstrap values V(s') come from target critic parameters, moved
  towards the online ones by ``target_tau`` every ``target_update_period`` updates (an update =
  all the epochs on one rollout; with period 1 and tau 1 the target is the critic that collected
  the rollout, as in PPO's precomputed GAE). Off (the default for actor-critic): V(s') comes
  from the online critic being trained.
* ``stop_gradient_advantage`` -- the advantage in the policy loss is detached. Off: the policy
  loss back-propagates into the critic through A = G - V(s) (and through the normalisation of A).
* ``stop_gradient_critic_features`` / ``stop_gradient_actor_features`` -- with a shared torso,
  the critic (resp. actor) head reads stop_gradient(torso features), so only the other loss trains
  the torso. No effect with separate torsos. Default off.

``layer_norm`` and ``shared_torso`` change the parameters' shapes and are static.

The optimizer (``agent.optimizer``: adam, adamw, sgd) is built by ``rlstop.agents.optim``;
``agent.freeze`` / ``agent.freeze_mode`` freeze parameter sub-trees (``actor_torso``,
``critic_torso`` or the shared ``torso``, ``policy_head``, ``value_head``, ``log_std``) and
``agent.init_from`` starts from an earlier run's parameters (``rlstop.agents.freeze``).
Freezing a sub-tree fixes parameters; ``stop_gradient_*_features`` detach features (the
parameters behind them stay trainable by the other loss).

Termination and truncation stay apart: discount = gamma * (1 - terminated); every step bootstraps
from the value of its true next observation (``final_obs``, the last observation where a time
limit cut the episode); the lambda-trace is cut at every episode end (``continue_t``), so no
return crosses into the next episode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from rlstop import losses
from rlstop.agents import freeze, optim
from rlstop.errors import UserError
from rlstop.networks import ACTIVATIONS, ActorCritic

KINDS = ("a2c", "ppo")


@dataclass(frozen=True)
class ActorCriticConfig:
    """PPO defaults: rejax's / CleanRL's CartPole settings."""

    kind: str = "ppo"
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    num_steps: int = 64              # rollout length per env
    num_epochs: int = 8              # passes over each rollout
    num_minibatches: int = 16        # per epoch; a minibatch is env.num_envs / num_minibatches envs
    clip_epsilon: float = 0.2        # PPO ratio clipping; 0 = plain policy gradient (A2C)
    value_clip_epsilon: float = 0.2  # PPO2 value clipping around the rollout's values; 0 = off
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5       # clip the global gradient norm; 0 = off
    normalize_advantages: bool = True  # per minibatch: (A - mean) / (std + 1e-8)
    anneal_lr: bool = False          # learning rate decays linearly to 0 over the run
    reward_scale: float = 1.0        # the critic learns rewards times this (logs stay in reward units)
    target_update_period: int = 1    # updates (rollouts learned from) between target-critic syncs
    target_tau: float = 1.0          # 1 = hard copy; < 1 = Polyak averaging at each sync
    optimizer: str = "adam"          # adam | adamw | sgd (rlstop.agents.optim)
    weight_decay: float = 0.0        # adamw: decoupled weight decay
    momentum: float = 0.0            # sgd: heavy-ball momentum
    # frozen sub-trees and initialisation from another run (rlstop.agents.freeze)
    freeze: list[str] = field(default_factory=list)  # e.g. [actor_torso]
    freeze_mode: str = "mask"        # mask (through the optimizer) | stop_gradient (in the loss)
    init_from: Optional[str] = None  # a finished run's folder
    init_params: Optional[list[str]] = None  # the sub-trees init_from loads; null = all
    # switches
    stop_gradient_advantage: bool = True
    stop_gradient_target: bool = True
    target_network: bool = False
    stop_gradient_critic_features: bool = False
    stop_gradient_actor_features: bool = False
    layer_norm: bool = False
    shared_torso: bool = False

    TRACED: ClassVar[tuple[str, ...]] = (
        "learning_rate", "gamma", "gae_lambda", "clip_epsilon", "value_clip_epsilon", "vf_coef",
        "ent_coef", "max_grad_norm", "normalize_advantages", "anneal_lr", "reward_scale",
        "target_update_period", "target_tau",
        "stop_gradient_advantage", "stop_gradient_target", "target_network",
        "stop_gradient_critic_features", "stop_gradient_actor_features",
        "weight_decay", "momentum",
    )
    SWITCHES: ClassVar[tuple[str, ...]] = (
        "stop_gradient_advantage", "stop_gradient_target", "target_network",
        "stop_gradient_critic_features", "stop_gradient_actor_features", "layer_norm", "shared_torso",
    )

    def validate(self, cfg) -> None:
        def check(cond, msg):
            if not cond:
                raise UserError(msg)

        check(self.kind in KINDS, f"agent.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        check(self.learning_rate > 0, f"agent.learning_rate={self.learning_rate} must be positive")
        check(0.0 <= self.gamma <= 1.0, f"agent.gamma={self.gamma} must be in [0, 1]")
        check(0.0 <= self.gae_lambda <= 1.0, f"agent.gae_lambda={self.gae_lambda} must be in [0, 1]")
        check(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
              f"agent.hidden_sizes={list(self.hidden_sizes)} must be a non-empty list of positive sizes")
        check(self.activation in ACTIVATIONS,
              f"agent.activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        check(self.num_steps >= 1, f"agent.num_steps={self.num_steps} must be >= 1")
        check(self.num_epochs >= 1, f"agent.num_epochs={self.num_epochs} must be >= 1")
        check(self.num_minibatches >= 1, f"agent.num_minibatches={self.num_minibatches} must be >= 1")
        check(cfg.env.num_envs % self.num_minibatches == 0,
              f"env.num_envs={cfg.env.num_envs} must be a multiple of agent.num_minibatches="
              f"{self.num_minibatches} (a minibatch is a group of whole env rollouts)")
        check(self.clip_epsilon >= 0, f"agent.clip_epsilon={self.clip_epsilon} must be >= 0 (0 = no clipping)")
        check(self.value_clip_epsilon >= 0,
              f"agent.value_clip_epsilon={self.value_clip_epsilon} must be >= 0 (0 = no clipping)")
        check(self.vf_coef >= 0, f"agent.vf_coef={self.vf_coef} must be >= 0")
        check(self.max_grad_norm >= 0, f"agent.max_grad_norm={self.max_grad_norm} must be >= 0 (0 = off)")
        check(self.reward_scale > 0, f"agent.reward_scale={self.reward_scale} must be positive")
        check(self.target_update_period >= 1,
              f"agent.target_update_period={self.target_update_period} must be >= 1")
        check(0.0 < self.target_tau <= 1.0, f"agent.target_tau={self.target_tau} must be in (0, 1]")
        optim.validate(self)
        freeze.validate(self, cfg)
        batch = self.num_steps * cfg.env.num_envs
        check(cfg.train.log_every % batch == 0,
              f"train.log_every={cfg.train.log_every} must be a multiple of agent.num_steps * env.num_envs "
              f"= {self.num_steps} * {cfg.env.num_envs} = {batch} (one rollout)")


@dataclass(frozen=True)
class A2CConfig(ActorCriticConfig):
    """The same schema with A2C's defaults: one plain policy-gradient step per rollout of 5 steps."""

    kind: str = "a2c"
    learning_rate: float = 7e-4
    gae_lambda: float = 1.0
    num_steps: int = 5
    num_epochs: int = 1
    num_minibatches: int = 1
    clip_epsilon: float = 0.0
    value_clip_epsilon: float = 0.0
    ent_coef: float = 0.0
    normalize_advantages: bool = False


def config_class(kind: str):
    return A2CConfig if kind == "a2c" else ActorCriticConfig


def hparams(cfg: ActorCriticConfig) -> dict:
    """The traced values of a config, as a dict of scalars (vmapped over by sweeps)."""
    out = {}
    for k in ActorCriticConfig.TRACED:
        v = getattr(cfg, k)
        out[k] = jnp.asarray(v, jnp.bool_ if isinstance(v, bool) else jnp.float32)
    return out


@flax.struct.dataclass
class ActorCriticState:
    params: flax.core.FrozenDict
    target_params: flax.core.FrozenDict  # the target critic (the policy part is carried, unused, never updated)
    opt_state: optax.OptState            # the optimizer's state for the parameters as flat vectors (``_flat``)
    updates: jnp.ndarray                 # updates (rollouts learned from) so far


@flax.struct.dataclass
class Rollout:
    """One rollout, time-major [T, N, ...] as collected, env-major [N, T, ...] in the update."""

    obs: jnp.ndarray
    action: jnp.ndarray
    logp: jnp.ndarray        # log pi_old(a|s) of the policy that acted
    reward: jnp.ndarray
    terminated: jnp.ndarray
    truncated: jnp.ndarray
    final_obs: jnp.ndarray   # the true next observation (the last one where an episode ended)


@flax.struct.dataclass
class Bootstrap:
    """Where each step's bootstrap value V(s') comes from, for env-major sequences [N, T].

    The true next observation of step t is obs[t+1], except where the episode ended at t (the
    env reset in between) and at the rollout's last step. Only truncations need the true final
    observation's value (a termination's discount is 0), so the critic evaluates obs[0..T-1]
    plus these few rows, not a second copy of the whole rollout.
    """

    obs: jnp.ndarray       # [N, K, *obs_shape] final observations of truncated steps and of step T-1
    use: jnp.ndarray       # [N, T] bool: step t bootstraps from one of those rows (else from obs[t+1])
    pick: jnp.ndarray      # [N, T, K] one-hot: which row (all zero where ``use`` is false)


@flax.struct.dataclass
class Aux:
    """What one rollout fixes for all its gradient steps, env-major [N, T]."""

    v_old: jnp.ndarray      # V(s) at collection time (PPO2 value clipping)
    v_target: jnp.ndarray   # V'(s') from the target critic (used when target_network is on)
    boot: Bootstrap


def _is_critic(path) -> bool:
    """Whether a parameter (its path in ``ActorCritic``'s tree) is read by ``ActorCritic.value``."""
    return any(getattr(k, "key", None) in ActorCritic.CRITIC_PARTS for k in path)


def bootstrap_rows(final_obs: jnp.ndarray, truncated: jnp.ndarray, k: int) -> Bootstrap:
    """The rows of ``final_obs`` [N, T, ...] that bootstrapping needs besides obs[1..T-1].

    ``k`` must bound the number of truncations per env plus one (the last step). Rows are
    picked with one-hot contractions (exact: one term is 1.0, the rest 0.0), which compile to
    less than a gather and its scatter transpose; unused rows are zero.
    """
    use = truncated.at[:, -1].set(True)
    slot = jnp.cumsum(use, axis=1) - 1
    pick = jax.nn.one_hot(jnp.where(use, slot, -1), k, dtype=final_obs.dtype)  # [N, T, K]
    rows = jnp.einsum("ntk,nt...->nk...", pick, final_obs)
    return Bootstrap(rows, use, pick)


def next_values(v_obs: jnp.ndarray, v_rows: jnp.ndarray, boot: Bootstrap) -> jnp.ndarray:
    """V(s'_t) [N, T] from V(obs) [N, T] and V(boot.obs) [N, K]: V(obs[t+1]), or the row's value."""
    shifted = jnp.concatenate([v_obs[:, 1:], v_obs[:, -1:]], axis=1)  # the last column is never used
    from_rows = jnp.sum(boot.pick * v_rows[:, None, :], axis=-1)
    return jnp.where(boot.use, from_rows, shifted)


class ActorCriticAgent:
    """Static pieces (network shapes, rollout and minibatch sizes) live on the object; values in ``hp``."""

    # The most memory, in bytes for the whole batch, that ``update`` spends on gathering every
    # epoch's minibatches before its gradient steps (one scan over them all) instead of one
    # epoch's at a time (a scan over epochs of scans over minibatches). See ``update``.
    FLAT_UPDATE_BYTES: ClassVar[int] = 64 << 20

    def __init__(self, cfg: ActorCriticConfig, env, num_envs: int, total_steps: int,
                 varying: frozenset = frozenset(), batch: int = 1):
        self.cfg = cfg
        # The traced values that differ across a vmapped batch; a shared one may choose a branch.
        self.varying = frozenset(varying)
        self.batch = batch  # runs trained together (vmapped), over all devices
        self.obs_shape = tuple(env.obs_shape)
        self.discrete = bool(getattr(env, "discrete", True))
        if self.discrete:
            action_dim = env.num_actions
        else:
            self.action_shape = tuple(env.action_shape)
            action_dim = math.prod(self.action_shape)
            self.action_low = jnp.reshape(env.action_low, (action_dim,))
            self.action_high = jnp.reshape(env.action_high, (action_dim,))
        self.network = ActorCritic(action_dim, self.discrete, tuple(cfg.hidden_sizes), cfg.activation,
                                   cfg.layer_norm, cfg.shared_torso)
        # Frozen sub-trees (static): masked in the optimizer, or detached in the loss.
        self.frozen = tuple(cfg.freeze)
        self.mask = bool(self.frozen) and cfg.freeze_mode == "mask"
        self.detached = self.frozen if cfg.freeze_mode == "stop_gradient" else ()
        if self.frozen or cfg.init_params:
            shapes = jax.eval_shape(self.network.init_params, jax.random.PRNGKey(0),
                                    jnp.zeros((1,) + self.obs_shape, jnp.float32))
            freeze.check_names(self.frozen, shapes, "agent.freeze")
            freeze.check_names(cfg.init_params, shapes, "agent.init_params")
        self.num_envs = num_envs
        rollouts = max(1, total_steps // (cfg.num_steps * num_envs))
        self.total_updates = rollouts * cfg.num_epochs * cfg.num_minibatches
        # Truncated episodes are exactly max_episode_steps long, so a rollout of num_steps holds at
        # most (num_steps - 1) // max_episode_steps + 1 truncations per env; one more row for the
        # rollout's last step.
        max_len = getattr(env, "max_episode_steps", None)
        self.max_bootstrap_rows = (min(cfg.num_steps, (cfg.num_steps - 1) // max_len + 2) if max_len
                                   else cfg.num_steps)

    # -- optimisation ---------------------------------------------------------------------------
    def optimizer(self, hp) -> optax.GradientTransformation:
        """``agent.optimizer`` (Adam by default; eps 1e-5, as CleanRL's PPO); the learning rate
        decays linearly to 0 if anneal_lr. With ``freeze_mode: mask``, a zero update for the
        frozen vector (see ``_flat``)."""
        total = self.total_updates

        def lr(count):
            frac = jnp.where(hp["anneal_lr"], 1.0 - count / total, 1.0)
            return hp["learning_rate"] * frac

        labels = {optim.FROZEN: optim.FROZEN, optim.TRAINABLE: optim.TRAINABLE} if self.mask else None
        return optim.build(self.cfg, hp, lr, eps=1e-5, labels=labels)

    def _flat(self, tree):
        """The parameters (or gradients) as the optimizer sees them, and the way back.

        One flat vector: a few fused kernels instead of a few per parameter array, which compiles
        and runs faster for these small networks. With ``freeze_mode: mask``, two: the frozen
        sub-trees and the rest, ``{FROZEN: ..., TRAINABLE: ...}``, so that the optimizer can
        tell them apart.
        """
        if not self.mask:
            return ravel_pytree(tree)
        chosen, rest = freeze.split(tree, self.frozen)
        (f, unravel_f), (r, unravel_r) = ravel_pytree(chosen), ravel_pytree(rest)
        return ({optim.FROZEN: f, optim.TRAINABLE: r},
                lambda v: freeze.merge(unravel_f(v[optim.FROZEN]), unravel_r(v[optim.TRAINABLE])))

    def init(self, key: jax.Array, hp) -> ActorCriticState:
        params = self.network.init_params(key, jnp.zeros((1,) + self.obs_shape, jnp.float32))
        opt_state = self.optimizer(hp).init(self._flat(params)[0])
        return ActorCriticState(params, params, opt_state, jnp.zeros((), jnp.int32))

    # -- acting ---------------------------------------------------------------------------------
    def _log_prob_entropy(self, pi, action):
        if self.discrete:
            return (jax.vmap(losses.categorical_log_prob)(pi, action),
                    jax.vmap(losses.categorical_entropy)(pi))
        mean, log_std = pi
        return jax.vmap(losses.gaussian_log_prob)(mean, log_std, action), jax.vmap(losses.gaussian_entropy)(log_std)

    def action_noise(self, key: jax.Array, shape: tuple) -> jnp.ndarray:
        """The randomness of ``act`` for a batch of ``shape`` (e.g. a whole rollout [T, N]) in one draw:
        standard Gumbel noise per action (discrete) or standard normal noise per dimension."""
        if self.discrete:
            return jax.random.gumbel(key, shape + (self.network.action_dim,))
        return jax.random.normal(key, shape + (self.network.action_dim,))

    def rollout_noise_words(self, shape: tuple) -> int:
        """How many random 32-bit words ``rollout_noise`` takes for a rollout of ``shape`` [T, N]."""
        return (math.prod(shape) + self.cfg.num_epochs * shape[-1]) * self.network.action_dim

    def rollout_noise(self, bits: jnp.ndarray, shape: tuple) -> tuple:
        """The randomness of an iteration of the scan loop, from random bits: ``action_noise``
        for a rollout of ``shape`` [T, N], and the update's minibatch shuffles [num_epochs, N]
        (iid values whose argsort per epoch is a uniformly random order of the envs).

        ``bits``: ``rollout_noise_words(shape)`` random uint32 words, e.g. the key data of keys
        the loop splits off anyway. Each random-number call is compiled code of its own, and on
        CPU a loop: the loop draws an iteration's keys and these bits in one. They become noise
        as in ``jax.random.gumbel`` and ``jax.random.normal``: a uniform float from the top 23
        bits of a word (its mantissa), then the inverse of the distribution's CDF.
        """
        rows, epochs, envs = math.prod(shape), self.cfg.num_epochs, shape[-1]
        dim = self.network.action_dim
        # Floats in [1, 2) from the mantissa bits, minus 1: uniform on [0, 1 - 2^-23].
        u = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
        if self.discrete:  # Gumbel: -log(-log(u)), u in [tiny, 1)
            tiny = np.finfo(np.float32).tiny
            noise = -jnp.log(-jnp.log(jnp.maximum(tiny, u * (1.0 - tiny) + tiny)))
        else:  # standard normal: sqrt(2) erfinv(v), v in (-1, 1)
            lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
            noise = np.float32(np.sqrt(2.0)) * jax.scipy.special.erfinv(jnp.maximum(lo, u * (1.0 - lo) + lo))
        noise = noise.reshape(-1, dim)
        return noise[:rows].reshape(shape + (dim,)), noise[rows:, 0].reshape(epochs, envs)

    def act(self, params, obs: jnp.ndarray, noise: jnp.ndarray):
        """Sample actions for a batch [N, *obs_shape] given ``action_noise`` [N, ...]:
        (action as stored, action for the env, log pi(action))."""
        pi = self.network.apply(params, obs, method=ActorCritic.policy)
        if self.discrete:
            action = jnp.argmax(pi + noise, axis=-1)  # Gumbel-max: a sample of softmax(logits)
            env_action = action
        else:
            mean, log_std = pi
            action = mean + jnp.exp(log_std) * noise
            # The Gaussian's sample is what log pi refers to; the env sees it clipped to its bounds.
            env_action = jnp.clip(action, self.action_low, self.action_high)
            env_action = env_action.reshape(env_action.shape[:-1] + self.action_shape)
        return action, env_action, self._log_prob_entropy(pi, action)[0]

    def greedy(self, params, obs: jnp.ndarray) -> jnp.ndarray:
        """The deterministic policy: argmax of the logits, or the Gaussian's mean (clipped)."""
        pi = self.network.apply(params, obs, method=ActorCritic.policy)
        if self.discrete:
            return jnp.argmax(pi, axis=-1)
        mean = jnp.clip(pi[0], self.action_low, self.action_high)
        return mean.reshape(mean.shape[:-1] + self.action_shape)

    def values(self, params, obs: jnp.ndarray) -> jnp.ndarray:
        return self.network.apply(params, obs, method=ActorCritic.value)

    # -- learning -------------------------------------------------------------------------------
    def loss(self, params, batch: Rollout, aux: Aux, hp):
        """Actor-critic loss on whole sequences, and metrics.

        ``batch`` is env-major [B, T, ...]; ``aux`` holds what the rollout fixed: the values at
        collection time (for value clipping), the target critic's bootstrap values, and where
        each step's V(s') is read (``bootstrap_rows``). Everything the switches act on is
        computed here, from ``params``:

            V(s), V(s')        one critic pass over the rollout's observations and its few
                               extra true next observations (V(s') = V(obs[t+1]) elsewhere);
                               with the target network on, V(s') is the target critic's instead
            G                  lambda_returns(r, gamma (1 - terminated), V(s'), 1 - done, lambda)
            A = G - V(s)       (normalised per minibatch if asked)
            actor loss         -log pi(a|s) A,  or PPO's clipped surrogate when clip_epsilon > 0
            critic loss        0.5 (V(s) - G)^2, or PPO2's clipped version when value_clip_epsilon > 0
            loss               actor + vf_coef critic - ent_coef entropy
        """
        b, t = batch.reward.shape
        flat = lambda x: x.reshape((b * t,) + x.shape[2:])  # noqa: E731
        boot = aux.boot
        params = freeze.detach(params, self.detached)  # freeze_mode: stop_gradient
        pi, v = self.network.apply(params, flat(batch.obs), boot.obs.reshape((-1,) + self.obs_shape),
                                   hp["stop_gradient_actor_features"], hp["stop_gradient_critic_features"])
        v_tm1 = v[:b * t].reshape(b, t)
        v_t = jnp.where(hp["target_network"], aux.v_target, next_values(v_tm1, v[b * t:].reshape(b, -1), boot))

        discount_t = hp["gamma"] * (1.0 - batch.terminated.astype(jnp.float32))
        continue_t = 1.0 - (batch.terminated | batch.truncated).astype(jnp.float32)
        returns = jax.vmap(lambda r, d, vt, c: losses.lambda_returns(
            r, d, vt, c, hp["gae_lambda"], stop_gradient=hp["stop_gradient_target"]))(
            batch.reward * hp["reward_scale"], discount_t, v_t, continue_t)

        adv = (returns - v_tm1).reshape(-1)
        adv_norm = (adv - jnp.mean(adv)) / (jnp.std(adv) + 1e-8)
        adv = jnp.where(hp["normalize_advantages"], adv_norm, adv)
        logp, entropy = self._log_prob_entropy(pi, flat(batch.action))
        sg_adv = hp["stop_gradient_advantage"]
        pg = losses.policy_gradient_loss(logp, adv, stop_gradient=sg_adv)
        ppo = losses.ppo_clipped_surrogate(logp, flat(batch.logp), adv, hp["clip_epsilon"], stop_gradient=sg_adv)
        actor_loss = jnp.mean(jnp.where(hp["clip_epsilon"] > 0, ppo, pg))

        v_flat, g_flat = v_tm1.reshape(-1), returns.reshape(-1)
        plain = 0.5 * jnp.square(v_flat - g_flat)
        clipped = losses.clipped_value_loss(v_flat, aux.v_old.reshape(-1), g_flat, hp["value_clip_epsilon"])
        critic_loss = jnp.mean(jnp.where(hp["value_clip_epsilon"] > 0, clipped, plain))

        entropy = jnp.mean(entropy)
        loss = actor_loss + hp["vf_coef"] * critic_loss - hp["ent_coef"] * entropy
        return loss, {"actor_loss": actor_loss, "critic_loss": critic_loss, "entropy": entropy}

    def gradient_step(self, state: ActorCriticState, batch: Rollout, aux: Aux, hp):
        """One gradient step on a minibatch: the global norm clipped to the traced max_grad_norm,
        then the optimizer, on the flat parameter vector(s) of ``_flat``. With ``freeze_mode:
        mask`` the frozen sub-trees' gradients are dropped first (``grad_norm`` and clipping see
        the trainable ones) and the optimizer gives them a zero update."""
        (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch, aux, hp)
        if self.mask:
            grads = freeze.zero(grads, self.frozen)
        flat_params, unravel = self._flat(state.params)
        grads = self._flat(grads)[0]
        grad_norm = optim.global_norm(grads)
        scale = optim.clip_scale(grad_norm, hp["max_grad_norm"])
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = self.optimizer(hp).update(grads, state.opt_state, flat_params)
        params = unravel(jax.tree.map(lambda p, u: p + u, flat_params, updates))
        metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
        return state.replace(params=params, opt_state=opt_state), metrics

    def update(self, state: ActorCriticState, rollout: Rollout, shuffle: jnp.ndarray, hp):
        """Learn from one time-major rollout [T, N]: ``num_epochs`` passes, each in
        ``num_minibatches`` minibatches of whole env sequences, in the order of
        ``argsort(shuffle[epoch])`` (``shuffle`` [num_epochs, N]: iid random values, e.g. from
        ``rollout_noise``, or ``jax.random.uniform``); then a target-critic sync if one is due.
        Returns the state and metrics (per gradient step [epochs, minibatches], and the
        rollout's values).

        The gradient steps run as one ``lax.scan`` over all epochs' minibatches, gathered before
        it, when those copies of the rollout fit in ``FLAT_UPDATE_BYTES`` for the whole batch;
        otherwise as a scan over epochs, each gathering its own minibatches for a scan over
        them. The two give the same results, bit for bit; the single scan is faster on CPU (one
        PPO CartPole seed, 2 cores: ~5-8%), the nested one holds one copy instead of
        ``num_epochs``.
        """
        cfg = self.cfg
        data = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), rollout)  # env-major [N, T, ...]
        n, t = data.reward.shape
        boot = bootstrap_rows(data.final_obs, data.truncated, self.max_bootstrap_rows)
        data = data.replace(final_obs=None)  # the loss reads the few rows it needs from ``boot``
        # One forward pass of each critic over the rollout: the online values at collection time
        # (value clipping, metrics) and the target critic's bootstrap values V'(s'), which are
        # fixed data for this update: the target parameters only move between updates.
        v_old = self.values(state.params, data.obs.reshape((n * t,) + self.obs_shape)).reshape(n, t)

        def target_values():
            obs = jnp.concatenate([data.obs.reshape((n * t,) + self.obs_shape),
                                   boot.obs.reshape((-1,) + self.obs_shape)])
            v = self.values(state.target_params, obs)
            return next_values(v[:n * t].reshape(n, t), v[n * t:].reshape(n, -1), boot)

        if "target_network" in self.varying:  # some runs of the batch use it: compute it for all
            v_target = target_values()
        else:  # the same for the whole batch: a real branch, skipped when the target network is off
            v_target = jax.lax.cond(hp["target_network"], target_values, lambda: jnp.zeros((n, t), v_old.dtype))
        aux = Aux(v_old, v_target, boot)
        per_mb = n // cfg.num_minibatches

        perms = jnp.argsort(shuffle, axis=1)

        def gather(perm, groups):  # the minibatches of the shuffles ``perm`` [..., N]
            return jax.tree.map(lambda x: x[perm].reshape((groups, per_mb) + x.shape[1:]), (data, aux))

        def steps(state, mbs):
            return jax.lax.scan(lambda s, mb: self.gradient_step(s, *mb, hp), state, mbs)

        rollout_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((data, aux)))
        if self.batch * cfg.num_epochs * rollout_bytes <= self.FLAT_UPDATE_BYTES:
            state, metrics = steps(state, gather(perms, cfg.num_epochs * cfg.num_minibatches))
            metrics = jax.tree.map(lambda m: m.reshape((cfg.num_epochs, cfg.num_minibatches) + m.shape[1:]), metrics)
        else:
            state, metrics = jax.lax.scan(lambda s, perm: steps(s, gather(perm, cfg.num_minibatches)), state, perms)
        updates = state.updates + 1
        # Polyak step of size tau when a sync is due (tau = 1: hard copy), else unchanged; for the
        # critic's parameters only: the policy part of the target is never read.
        step = jnp.where(jnp.mod(updates, hp["target_update_period"]) == 0, hp["target_tau"], 0.0)
        target_params = jax.tree_util.tree_map_with_path(
            lambda path, tp, p: tp + step * (p - tp) if _is_critic(path) else tp, state.target_params, state.params)
        # In reward units (the critic learns scaled rewards), so that the soft-divergence bound
        # r_max / (1 - gamma) applies as it stands.
        metrics["value_mean"] = jnp.mean(v_old) / hp["reward_scale"]
        metrics["value_max_abs"] = jnp.max(jnp.abs(v_old)) / hp["reward_scale"]
        return state.replace(target_params=target_params, updates=updates), metrics
