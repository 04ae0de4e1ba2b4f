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


class NatureCNN(nn.Module):
    """The convolutional torso of DQN (Mnih et al. 2015): 32 8x8 filters stride 4, 64 4x4 stride 2,
    64 3x3 stride 1, each followed by ReLU, then flattened.

    Takes stacked frames channels-first, [..., C, H, W] (as gymnasium's FrameStackObservation
    gives them; uint8 in [0, 255], scaled to [0, 1] here, so replay can store bytes).
    """

    @nn.compact
    def __call__(self, frames: jnp.ndarray) -> jnp.ndarray:
        x = jnp.moveaxis(jnp.asarray(frames, jnp.float32) / 255.0, -3, -1)  # -> [..., H, W, C]
        for features, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
            x = nn.relu(nn.Conv(features, (kernel, kernel), (stride, stride), padding="VALID")(x))
        return x.reshape(x.shape[:-3] + (-1,))


class ConvQNetwork(nn.Module):
    """Q(s, .) on image observations: NatureCNN torso, then the MLP (512 units in the paper, with
    the same LayerNorm option as ``QNetwork``) and a linear head with one output per action."""

    num_actions: int
    hidden_sizes: Sequence[int] = (512,)
    activation: str = "relu"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs: jnp.ndarray) -> jnp.ndarray:
        x = NatureCNN(name="cnn")(obs)
        x = MLP(self.hidden_sizes, self.activation, self.layer_norm, name="torso")(x)
        return nn.Dense(self.num_actions, name="head")(x)
