"""Flax (linen) modules: MLP torso, Q head, actor-critic, linear value.

Shape-changing options (hidden sizes, LayerNorm, shared torso) are module attributes and
therefore static; everything that only changes values is passed in at call time.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "tanh": nn.tanh, "gelu": nn.gelu, "silu": nn.silu}


@jax.custom_vjp
def matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x [..., n] @ w [n, m], whose kernel gradient is computed from a materialised transpose.

    Autodiff's own kernel gradient contracts x and g over their leading (row) axis. XLA's CPU
    backend hands that transposed-operand product to a slower routine than the forward one (for
    the MLPs here the weight gradients cost more than the forward products); a materialised
    transpose -- an optimization barrier keeps XLA from folding it back into the product -- turns
    it into the ordinary kind:

    - m >= n (a torso layer): x^T [n, rows] @ g. A 4-64-64-2 tanh MLP's forward and backward pass
      on 264 rows, 2 cores: 119 -> 101 us; vmapped over 8 seeds on one core 935 -> 809 us.
    - m < n (a head, whose output is narrow): (g^T [m, rows] @ x)^T, which copies the small g
      rather than x; the outer barrier keeps XLA from folding the last transpose into the product.
      A 4-64-64-2 actor's gradient step: 110.5 -> 99 us.

    The input gradient of a head with at most ``NARROW`` outputs is a sum of broadcast products,
    g[:, j] w[:, j]^T, which XLA fuses into the next kernel (the activation's derivative), rather
    than a product of its own: each backward chain of ``ActorCritic`` then starts with one kernel
    (see ``_fork``).

    Values are those of ``x @ w`` and its gradients up to float32 rounding.
    """
    return x @ w


NARROW = 2  # heads with at most this many outputs: input gradient as broadcast products


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    n, m = w.shape
    x2, g2 = x.reshape(-1, n), g.reshape(-1, m)
    if m < n:
        dw = jax.lax.optimization_barrier(jax.lax.optimization_barrier(g2.T) @ x2).T
    else:
        dw = jax.lax.optimization_barrier(x2.T) @ g2
    dx = sum(g[..., j:j + 1] * w[:, j] for j in range(m)) if m <= NARROW else g @ w.T
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# XLA's CPU runtime (jaxlib 0.10) runs the kernels that become ready together on the thread that
# made them ready, unless more than this many are ready at once: then it hands some to a second
# thread (ThunkExecutor's split threshold).
RUNTIME_SPLIT_THRESHOLD = 8


@jax.custom_vjp
def _fork(pi, v, z):
    """(pi, v) unchanged; in the backward pass, the actor's and the critic's output gradients
    released together, so that their two backward chains run on two threads.

    The two chains are independent as data but, on XLA's CPU runtime, run one after the other on
    one thread: they become ready one at a time, and their temporaries share memory, which the
    runtime orders too. Here both cotangents come out of one concatenation behind an optimization
    barrier, and ``RUNTIME_SPLIT_THRESHOLD + 1`` reductions of it become ready at the same time,
    so the runtime hands work to a second thread. The reductions' sum times 0 is the cotangent of
    ``z`` (0 times the sum of the value head's bias, see ``ActorCritic``), which keeps them in
    the program and changes no gradient. One PPO CartPole seed on 2 cores: ~7-13% less time per
    run (``results/bench/cpu.md``), and only together with the heads' input gradients as
    broadcast products (``matmul``); without them, no gain.
    """
    return pi, v


def _fork_fwd(pi, v, z):
    return (pi, v), None


def _fork_bwd(_, g):
    flat, unravel = ravel_pytree(g)
    flat = jax.lax.optimization_barrier(flat)
    ready = sum(jnp.sum(flat * (k + 1)) for k in range(RUNTIME_SPLIT_THRESHOLD + 1))
    g_pi, g_v = unravel(flat)
    return g_pi, g_v, 0.0 * ready


_fork.defvjp(_fork_fwd, _fork_bwd)


def _dense_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    (contract_x, contract_w), batch = dimension_numbers
    assert tuple(contract_x) == (x.ndim - 1,) and tuple(contract_w) == (0,) and not any(batch), dimension_numbers
    return matmul(x, w)


class Dense(nn.Dense):
    """``flax.linen.Dense`` (same parameters, names and initialisers) through ``matmul``."""

    dot_general: Callable = _dense_dot_general


@jax.custom_batching.custom_vmap
def qr_one_at_a_time(a: jnp.ndarray):
    """``jnp.linalg.qr(a)`` of one matrix; under ``vmap`` the matrices go one after another.

    On CPU a batched QR is a LAPACK call that splits the batch over XLA's intra-op thread pool
    and blocks a pool thread until its pieces are done. Two such calls running side by side (the
    several kernels of a vmapped initialisation) can block every thread of a small pool, and the
    computation then never finishes (seen on 2 cores with 256 seeds: a hang, no CPU use). A batch
    of one runs inline, so mapping over the batch cannot deadlock; an initialisation is run once,
    so the sequential loop costs little (~0.3 s for 1024 seeds x 6 kernels here).
    """
    q, r = jnp.linalg.qr(a)
    return q, r


@qr_one_at_a_time.def_vmap
def _qr_vmap(axis_size, in_batched, a):
    del axis_size
    if not in_batched[0]:
        return qr_one_at_a_time(a), (False, False)
    return jax.lax.map(qr_one_at_a_time, a), (True, True)


def init_from_one_draw(module: nn.Module, key: jax.Array, example, draw, kernel) -> dict:
    """``module``'s variables with every kernel cut from one random draw.

    ``draw(key, (n,))`` gives the numbers for all kernels at once; ``kernel(path, flat, shape)``
    turns a kernel's slice of them into its values. LayerNorm scales are 1 and every other
    parameter (biases, a log-std) is 0. One random-number call site instead of one per layer
    compiles several times faster (a 120-84 Q-network on 2 cores: 0.27 s instead of 0.69 s).
    """
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), example)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    noise = draw(key, (sum(s.size for path, s in leaves if path[-1].key == "kernel"),))
    out, offset = [], 0
    for path, s in leaves:
        name = path[-1].key
        if name == "kernel":
            out.append(kernel(path, noise[offset:offset + s.size], s.shape).astype(s.dtype))
            offset += s.size
        else:
            out.append(jnp.full(s.shape, 1.0 if name == "scale" else 0.0, s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# The standard deviation of a standard normal truncated to [-2, 2] (flax's variance_scaling).
TRUNCATED_NORMAL_STD = .87962566103423978


def lecun_normal_init(module: nn.Module, key: jax.Array, example) -> dict:
    """Variables distributed as ``module.init(key, example)``'s for a module that keeps flax's
    default initialisers (Dense and Conv kernels ``lecun_normal``: a normal truncated to two
    standard deviations, variance 1 / fan_in; zero biases; unit LayerNorm scales), from one
    draw (``init_from_one_draw``)."""
    def lecun(path, flat, shape):
        fan_in = math.prod(shape[:-1])
        return flat.reshape(shape) * (1.0 / fan_in) ** 0.5 / TRUNCATED_NORMAL_STD

    return init_from_one_draw(module, key, example, lambda k, n: jax.random.truncated_normal(k, -2.0, 2.0, n),
                              lecun)


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
            x = Dense(size, kernel_init=self.kernel_init)(x)
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
        return Dense(self.num_actions, name="head")(x)


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
        return Dense(self.num_actions, name="head")(x)


def _maybe_stop(x: jnp.ndarray, flag) -> jnp.ndarray:
    """stop_gradient(x) where ``flag`` (a Python or traced boolean scalar) is true, else x."""
    return jnp.where(flag, jax.lax.stop_gradient(x), x)


class ActorCritic(nn.Module):
    """Policy pi(.|s) and state value V(s), with a shared or separate MLP torso.

    Initialisation as CleanRL / rejax PPO: orthogonal, gain sqrt(2) in the torso, 0.01 on the
    policy head (a near-uniform / near-zero-mean first policy), 1.0 on the value head; zero biases.
    ``init_params`` draws the same distribution from one normal draw (faster to compile than
    ``init``, which draws per parameter).

    The policy is categorical (``discrete``: the head gives ``action_dim`` logits) or a diagonal
    Gaussian (the head gives the mean; the log standard deviation is a state-independent
    parameter, initialised to 0, as in CleanRL's and rejax's continuous PPO).

    With ``shared_torso`` the two heads read one torso's features, and each head may read them
    through a stop-gradient (traced flags, passed at call time), so that only the other loss
    trains the torso. With separate torsos the flags change nothing: each head owns its torso,
    and the two networks' backward passes are released together (``_fork``), so that XLA's CPU
    runtime runs them side by side.
    """

    action_dim: int
    discrete: bool
    hidden_sizes: Sequence[int]
    activation: str = "tanh"
    layer_norm: bool = False
    shared_torso: bool = False

    GAINS = {"policy_head": 0.01, "value_head": 1.0}  # orthogonal-init gain per layer; sqrt(2) elsewhere
    TORSO_GAIN = 2.0 ** 0.5
    CRITIC_PARTS = ("torso", "critic_torso", "value_head")  # the submodules ``value`` reads

    def setup(self):
        torso = lambda name: MLP(self.hidden_sizes, self.activation, self.layer_norm,  # noqa: E731
                                 kernel_init=nn.initializers.orthogonal(self.TORSO_GAIN), name=name)
        if self.shared_torso:
            self.torso = torso("torso")
        else:
            self.actor_torso = torso("actor_torso")
            self.critic_torso = torso("critic_torso")
        self.policy_head = Dense(self.action_dim, kernel_init=nn.initializers.orthogonal(self.GAINS["policy_head"]),
                                    name="policy_head")
        self.value_head = Dense(1, kernel_init=nn.initializers.orthogonal(self.GAINS["value_head"]),
                                   name="value_head")
        if not self.discrete:
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))

    def _policy_out(self, h):
        out = self.policy_head(h)
        if self.discrete:
            return out
        return out, jnp.broadcast_to(self.log_std, out.shape)

    def __call__(self, obs: jnp.ndarray, value_obs: jnp.ndarray | None = None,
                 stop_gradient_actor_features=False, stop_gradient_critic_features=False):
        """Policy outputs for ``obs`` [N, ...] and values for ``[obs; value_obs]`` [N + M].

        ``value_obs`` (e.g. the next observations a critic target bootstraps from) goes through
        the critic in the same forward pass as ``obs``. Returns ``(policy, values)`` where
        ``policy`` is logits [N, A] (discrete) or ``(mean, log_std)``, each [N, D].
        """
        n = obs.shape[0]
        all_obs = obs if value_obs is None else jnp.concatenate([obs, value_obs])
        if self.shared_torso:
            h = self.torso(all_obs)
            h_pi = _maybe_stop(h[:n], stop_gradient_actor_features)
            h_v = _maybe_stop(h, stop_gradient_critic_features)
        else:
            h_pi = self.actor_torso(obs)
            h_v = self.critic_torso(all_obs)
        pi, v = self._policy_out(h_pi), self.value_head(h_v)[..., 0]
        if self.shared_torso:  # one backward chain: nothing to run side by side
            return pi, v
        return _fork(pi, v, 0.0 * jnp.sum(self.value_head.variables["params"]["bias"]))

    def policy(self, obs: jnp.ndarray):
        """Policy outputs only (acting, evaluation)."""
        return self._policy_out(self.torso(obs) if self.shared_torso else self.actor_torso(obs))

    def value(self, obs: jnp.ndarray) -> jnp.ndarray:
        """V(obs) only, [N] (e.g. bootstrap values from target parameters)."""
        return self.value_head(self.torso(obs) if self.shared_torso else self.critic_torso(obs))[..., 0]

    def init_params(self, key: jax.Array, obs: jnp.ndarray):
        """Variables distributed as ``self.init(key, obs)``'s would be, from one random draw.

        Every kernel is orthogonal with its layer's gain (the QR construction of
        ``nn.initializers.orthogonal``), cut from one normal draw for all layers; LayerNorm
        scales are 1, every other parameter (biases, the log-std) is 0. One random-number call
        site instead of one per parameter compiles several times faster.
        """
        def orthogonal(path, flat, shape):
            rows, cols = shape
            q, r = qr_one_at_a_time(flat.reshape(max(rows, cols), min(rows, cols)))
            q = q * jnp.sign(jnp.diag(r))
            q = q if rows >= cols else q.T
            return self.GAINS.get(path[-2].key, self.TORSO_GAIN) * q

        return init_from_one_draw(self, key, obs, jax.random.normal, orthogonal)
