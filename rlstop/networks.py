"""Flax (linen) modules: MLP torso, Q head, actor-critic, linear value.

Shape-changing options (hidden sizes, LayerNorm, shared torso) are module attributes and
therefore static; everything that only changes values is passed in at call time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "tanh": nn.tanh, "gelu": nn.gelu, "silu": nn.silu}


class MLP(nn.Module):
    """Dense layers with an activation after each; LayerNorm before the activation if asked.

    LayerNorm after each hidden layer is the PQN recipe (Gallici et al. 2024) that keeps TD
    learning stable without a target network.
    """

    hidden_sizes: Sequence[int]
    activation: str = "relu"
    layer_norm: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        act = ACTIVATIONS[self.activation]
        for size in self.hidden_sizes:
            x = nn.Dense(size, kernel_init=self.kernel_init)(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
            x = act(x)
        return x


class QNetwork(nn.Module):
    """Q(s, .): MLP torso and a linear head with one output per action."""

    num_actions: int
    hidden_sizes: Sequence[int]
    activation: str = "relu"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs: jnp.ndarray) -> jnp.ndarray:
        x = obs.reshape(obs.shape[:-1] + (-1,)) if obs.ndim > 1 else obs
        x = MLP(self.hidden_sizes, self.activation, self.layer_norm, name="torso")(x)
        return nn.Dense(self.num_actions, name="head")(x)
