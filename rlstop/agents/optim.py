"""The optimizer of every agent (DQN, A2C, PPO), built in one place from its config.

Config keys (the same in every agent):

* ``agent.optimizer: adam | adamw | sgd`` (static: it fixes the optimizer state's shape).
  Default adam, exactly the optimizer the agents used before the key existed.
* ``agent.weight_decay`` (adamw only): decoupled weight decay (Loshchilov & Hutter 2019), as
  ``optax.adamw`` applies it: w <- w - lr * (adam_update + weight_decay * w). The decay does not
  pass through Adam's moments, so it moves a parameter even where its gradient is exactly zero.
* ``agent.momentum`` (sgd only): heavy-ball momentum, ``optax.sgd(lr, momentum)``.
* ``agent.max_grad_norm``: clipping of the global gradient norm (0 = off). DQN's is static (it
  adds ``optax.clip_by_global_norm`` to the chain); the actor-critic's is traced (a sweep may
  vary it in one compile), applied by ``clip_scale`` before the optimizer.

The learning rate, weight decay and momentum are traced: the optimizer is built inside the
jitted update from ``hp``, so one compile serves every value.

With ``labels`` (``agent.freeze_mode: mask``), the parameters labelled ``FROZEN`` get a zero
update from ``optax.set_to_zero()`` whatever the optimizer: neither weight decay nor momentum
moves them. The others go through the optimizer above.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlstop.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
FROZEN, TRAINABLE = "frozen", "trainable"


def validate(agent_cfg) -> None:
    """The optimizer keys of an agent config -> UserError naming the key and the fix."""
    a = agent_cfg
    if a.optimizer not in OPTIMIZERS:
        raise UserError(f"agent.optimizer={a.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if a.weight_decay < 0:
        raise UserError(f"agent.weight_decay={a.weight_decay} must be >= 0")
    if a.weight_decay > 0 and a.optimizer != "adamw":
        raise UserError(f"agent.weight_decay={a.weight_decay} applies to agent.optimizer=adamw only (decoupled "
                        f"weight decay); set agent.optimizer=adamw or agent.weight_decay=0")
    if not 0.0 <= a.momentum < 1.0:
        raise UserError(f"agent.momentum={a.momentum} must be in [0, 1)")
    if a.momentum > 0 and a.optimizer != "sgd":
        raise UserError(f"agent.momentum={a.momentum} applies to agent.optimizer=sgd only (Adam has its own); "
                        f"set agent.optimizer=sgd or agent.momentum=0")


def build(agent_cfg, hp, learning_rate, *, eps: float = 1e-8, max_grad_norm: float = 0.0,
          labels=None) -> optax.GradientTransformation:
    """The agent's optimizer.

    Args:
      agent_cfg: the agent config (``optimizer`` is read; it is static).
      hp: the traced values (``weight_decay``, ``momentum``).
      learning_rate: a traced scalar, or an optax schedule of the update count.
      eps: Adam's epsilon (1e-8 as optax; the actor-critic uses CleanRL's 1e-5).
      max_grad_norm: a static clipping threshold; 0 = none.
      labels: None, or ``FROZEN`` / ``TRAINABLE`` per leaf of the parameters (a pytree of the
        same structure, or a function of the parameters that returns one).
    """
    name = agent_cfg.optimizer
    if name == "adam":
        tx = optax.adam(learning_rate, eps=eps)
    elif name == "adamw":
        tx = optax.adamw(learning_rate, eps=eps, weight_decay=hp["weight_decay"])
    elif name == "sgd":
        tx = optax.sgd(learning_rate, momentum=hp["momentum"])
    else:  # validate() has said so already
        raise UserError(f"agent.optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")
    if max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    if labels is not None:
        tx = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
    return tx


def global_norm(tree) -> jnp.ndarray:
    """sqrt of the sum of squares of every entry (one array: exactly ``sqrt(sum(g**2))``)."""
    leaves = jax.tree.leaves(tree)
    if len(leaves) == 1:
        return jnp.sqrt(jnp.sum(jnp.square(leaves[0])))
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def clip_scale(grad_norm, max_grad_norm) -> jnp.ndarray:
    """The factor that brings a gradient of norm ``grad_norm`` down to a traced ``max_grad_norm``
    (1 when it is below, or when ``max_grad_norm`` is 0 = off)."""
    return jnp.where(max_grad_norm > 0, jnp.minimum(1.0, max_grad_norm / (grad_norm + 1e-6)), 1.0)
