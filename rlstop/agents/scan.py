"""``lax.scan`` with fewer output buffers: metrics stacked, a rollout's steps packed.

A scan writes each of its per-step outputs into a buffer of its own, and each write is a kernel
for XLA to compile. A dict of metrics stacked into one array per dtype and shape, or a pytree of
arrays packed into one float vector, is one write per step instead of one per array. The values
are the same, bit for bit. Shared by the agents and the loops.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def stack(metrics: dict) -> tuple[list, list]:
    """The arrays of ``metrics`` stacked on a last axis, one stack per dtype and shape, and the
    names in each: ``(stacks, groups)``."""
    by_kind = {}
    for name in sorted(metrics):  # the order of a dict through jax (its keys sorted)
        x = metrics[name]
        by_kind.setdefault((jnp.result_type(x), jnp.shape(x)), []).append(name)
    groups = list(by_kind.values())
    return [jnp.stack([jnp.asarray(metrics[n]) for n in names], axis=-1) for names in groups], groups


def unstack(vectors, groups: list) -> dict:
    """The dict of ``stack``'s ``vectors`` (jax or numpy, with any leading axes), by name."""
    return {n: v[..., i] for v, names in zip(vectors, groups) for i, n in enumerate(names)}


def scan_stacked(f: Callable, init, xs=None, length: int | None = None):
    """``jax.lax.scan(f, init, xs, length)`` for an ``f`` whose per-step output is a dict of
    arrays (metrics), which go through the scan stacked. Returns ``(carry, {name: [steps, ...]})``."""
    groups = []  # found when ``f`` is traced

    def body(carry, x):
        carry, vectors = f(carry, x)
        vectors, groups[:] = stack(vectors)
        return carry, vectors

    carry, vectors = jax.lax.scan(body, init, xs, length=length)
    return carry, unstack(vectors, groups)


def scan_packed(f: Callable, init, xs=None, length: int | None = None):
    """``jax.lax.scan(f, init, xs, length)`` whose per-step output, a pytree of arrays, goes
    through the scan as one float vector (booleans as 0 and 1, integers as floats: exact below
    2^24, e.g. discrete actions), so that each step writes one output buffer rather than one per
    array. Returns the carry and the outputs as a plain scan does, the same values."""
    spec = []  # [treedef, shapes, dtypes] of the outputs, found when ``f`` is traced

    def body(carry, x):
        carry, out = f(carry, x)
        leaves, treedef = jax.tree.flatten(out)
        dtype = jnp.result_type(*(leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)))
        spec[:] = [treedef, [leaf.shape for leaf in leaves], [leaf.dtype for leaf in leaves]]
        return carry, jnp.concatenate([leaf.reshape(-1).astype(dtype) for leaf in leaves])

    carry, ys = jax.lax.scan(body, init, xs, length=length)
    treedef, shapes, dtypes = spec
    out, start = [], 0
    for shape, dtype in zip(shapes, dtypes):
        size = math.prod(shape)
        column = ys[:, start:start + size].reshape(ys.shape[:1] + shape)
        out.append(column != 0 if dtype == jnp.bool_ else column.astype(dtype))
        start += size
    return carry, jax.tree.unflatten(treedef, out)
