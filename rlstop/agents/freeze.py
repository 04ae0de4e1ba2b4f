"""Freezing parameter sub-trees, and starting from an earlier run's parameters.

A sub-tree is named by its top-level key under ``params``: ``torso`` and ``head`` for DQN's
Q-network; ``actor_torso``, ``critic_torso`` (or one shared ``torso``), ``policy_head``,
``value_head`` and, for Gaussian policies, ``log_std`` for the actor-critic.

``agent.freeze: [names]`` with ``agent.freeze_mode`` (static):

* ``mask`` freezes through the optimizer: ``optim.build`` labels the sub-trees ``FROZEN`` and
  ``optax.multi_transform`` gives them ``optax.set_to_zero()``, so they never move, whatever the
  optimizer (weight decay and momentum included). Their gradients are dropped before the
  optimizer too, as ``requires_grad=False`` would drop them: ``grad_norm`` and gradient clipping
  see the trainable parameters only.
* ``stop_gradient`` detaches them in the forward pass: the loss reads
  ``jax.lax.stop_gradient`` of those parameters, so their gradient is exactly zero -- but the
  optimizer still updates them. With a zero gradient from the start, Adam's step is 0
  (mu = nu = 0, and 0 / (sqrt(0) + eps) = 0) and so is SGD's with momentum; AdamW's decoupled
  weight decay is not: every step multiplies them by (1 - lr * weight_decay), so after N steps
  they are (1 - lr * wd)^N times what they were. (Momentum would move them too had it built up
  before they were detached.) A stop-gradient detaches; it does not freeze.

With ``agent.freeze`` non-empty the loops log ``frozen_param_drift``: the L2 norm of the frozen
parameters (all frozen sub-trees together) minus their values at the start of the run, and
with more than one sub-tree frozen also ``frozen_param_drift/<name>`` per sub-tree.

``agent.init_from: RUN_DIR`` starts the parameters from a finished run's final checkpoint
(``RUN_DIR/checkpoints/final``): all of them, or the sub-trees named in ``agent.init_params``.
Seed i of the new run (its i-th seed, counted from 0) takes seed ``i mod n`` of the earlier run's
n seeds. The target parameters start equal to the new online ones, and the optimizer state
starts afresh (zero moments, step count 0). The earlier run must be of the same ``agent.kind``,
and every loaded parameter must have the shape the new config gives it.
"""
from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlstop.agents import optim
from rlstop.errors import UserError

MODES = ("mask", "stop_gradient")


# ---------------------------------------------------------------------------------------------
# Config checks that need nothing but the config (config.validate calls them).

def validate(agent_cfg, cfg) -> None:
    a = agent_cfg
    if a.freeze_mode not in MODES:
        raise UserError(f"agent.freeze_mode={a.freeze_mode!r} is not one of {', '.join(MODES)}")
    for key in ("freeze", "init_params"):
        names = getattr(a, key)
        if names is None:
            continue
        if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise UserError(f"agent.{key}={list(names)} must be a list of distinct parameter sub-tree names, "
                            f"e.g. [torso]")
    if a.init_params is not None and not a.init_from:
        raise UserError("agent.init_params names what agent.init_from loads; set agent.init_from=RUN_DIR "
                        "or agent.init_params=null")
    if a.init_params is not None and len(a.init_params) == 0:
        raise UserError("agent.init_params=[] loads nothing; name sub-trees (e.g. [torso]) or leave it null "
                        "to load all of them")
    if a.init_from is not None and not str(a.init_from).strip():
        raise UserError("agent.init_from is empty; give a finished run's folder or null")
    if a.freeze or a.init_from:
        from rlstop.envs import resolve_backend

        if resolve_backend(cfg.env) == "gymnasium":
            raise UserError(f"agent.freeze and agent.init_from need a JAX-native env; {cfg.env.id!r} runs on the "
                            "gymnasium host loop, which does not support them")


# ---------------------------------------------------------------------------------------------
# Sub-trees of a parameter tree {"params": {name: sub-tree, ...}}.

def names_of(params) -> tuple[str, ...]:
    return tuple(params["params"])


def check_names(names, params, key: str) -> None:
    """UserError when a name in ``names`` (the value of config key ``key``) is not a sub-tree."""
    have = names_of(params)
    for n in names or ():
        if n not in have:
            raise UserError(f"{key}={list(names)}: this network has no parameter sub-tree {n!r}; "
                            f"its sub-trees are {', '.join(have)}")


def split(params, names):
    """(the named sub-trees, the rest), each a tree of the same form as ``params``."""
    inner = params["params"]
    chosen = {k: v for k, v in inner.items() if k in names}
    rest = {k: v for k, v in inner.items() if k not in names}
    return {"params": chosen}, {**params, "params": rest}


def merge(chosen, rest):
    """The inverse of ``split``."""
    return {**rest, "params": {**rest["params"], **chosen["params"]}}


def select(params, names):
    return split(params, names)[0]


def detach(params, names):
    """``params`` with the named sub-trees read through ``jax.lax.stop_gradient``."""
    if not names:
        return params
    chosen, rest = split(params, names)
    return merge(jax.lax.stop_gradient(chosen), rest)


def zero(grads, names):
    """``grads`` with the named sub-trees set to exact zeros."""
    if not names:
        return grads
    chosen, rest = split(grads, names)
    return merge(jax.tree.map(jnp.zeros_like, chosen), rest)


def labels(params, names):
    """``optim.FROZEN`` for the leaves of the named sub-trees, ``optim.TRAINABLE`` elsewhere."""
    chosen, rest = split(params, names)
    return merge(jax.tree.map(lambda _: optim.FROZEN, chosen), jax.tree.map(lambda _: optim.TRAINABLE, rest))


def drift(params, initial, names) -> dict:
    """``frozen_param_drift``: ||frozen(params) - initial|| over all named sub-trees, and per
    sub-tree (``frozen_param_drift/<name>``) when there are several."""
    diff = jax.tree.map(jnp.subtract, select(params, names), initial)
    out = {"frozen_param_drift": optim.global_norm(diff)}
    if len(names) > 1:
        out.update({f"frozen_param_drift/{n}": optim.global_norm(diff["params"][n]) for n in names})
    return out


def runner_with_initial(runner_cls):
    """``runner_cls`` (a loop's ``flax.struct`` runner) with one more field, ``frozen0``: the frozen
    sub-trees' values at the start of the run (``drift``). A subclass, so that runs without
    ``agent.freeze`` keep the state (and checkpoints) they had."""

    @flax.struct.dataclass
    class FrozenRunner(runner_cls):
        frozen0: Any

    FrozenRunner.__module__ = runner_cls.__module__
    return FrozenRunner


def metric_names(names) -> tuple[str, ...]:
    if not names:
        return ()
    return ("frozen_param_drift",) + (tuple(f"frozen_param_drift/{n}" for n in names) if len(names) > 1 else ())


# ---------------------------------------------------------------------------------------------
# agent.init_from: the loops' hooks (``check_inputs`` before anything is written, ``prepare``
# after the batch state is initialised). They read runs through rlstop.evaluate and build
# programs through rlstop.train.driver, imported when used (those modules import the agents).

def _source_config(cfg):
    """The config of the run ``cfg.agent.init_from`` names, after checking it can serve."""
    from rlstop import config as config_lib
    from rlstop import results
    from rlstop.envs import resolve_backend

    d = cfg.agent.init_from
    if not (results.is_complete(d) and os.path.isdir(os.path.join(d, "checkpoints", "final"))):
        raise UserError(f"agent.init_from={d!r} is not a finished run (no summary.json and checkpoints/final, which "
                        "`rlstop train` writes when a run ends); give the folder of a finished run")
    src = config_lib.build_config(config_lib._read_yaml(os.path.join(d, "config.yaml")),
                                  source=os.path.join(d, "config.yaml"))
    if src.agent.kind != cfg.agent.kind:
        raise UserError(f"agent.init_from={d!r} is a {src.agent.kind} run and this is a {cfg.agent.kind} run; "
                        f"initialise from a run of the same agent.kind")
    if resolve_backend(src.env) == "gymnasium":
        raise UserError(f"agent.init_from={d!r} ran on the gymnasium host loop; init_from reads runs of "
                        "JAX-native envs only")
    return src


def _param_shapes(cfg):
    """Shapes of one seed's parameters under ``cfg`` (builds the program: the agent checks the
    names in agent.freeze and agent.init_params against its network)."""
    from rlstop.train import driver

    program = driver.make_program(cfg, driver.make_env(cfg.env))
    hp, _ = driver.batch_hparams([cfg])
    return jax.eval_shape(program.init, jax.random.PRNGKey(0), hp).agent.params


def _check_compatible(cfg, src_shapes, dst_shapes) -> None:
    """Every parameter ``cfg`` loads exists in the source with the same shape (else UserError
    naming the first parameter that differs, and both shapes)."""
    d = cfg.agent.init_from
    names = cfg.agent.init_params or names_of(dst_shapes)
    missing = [n for n in names if n not in names_of(src_shapes)]
    if missing:
        raise UserError(f"agent.init_from={d!r}: that run's network has no parameter sub-tree {missing[0]!r} "
                        f"(it has {', '.join(names_of(src_shapes))}); check agent.init_params and the network keys")
    path = lambda p: "/".join(str(getattr(k, "key", k)) for k in p)  # noqa: E731
    src = {path(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(select(src_shapes, names))[0]}
    dst = {path(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(select(dst_shapes, names))[0]}
    for p in sorted(set(src) | set(dst)):
        if src.get(p) != dst.get(p):
            show = lambda s: "absent" if s is None else str(tuple(s))  # noqa: E731
            raise UserError(f"agent.init_from={d!r}: parameter {p} has shape {show(src.get(p))} there and "
                            f"{show(dst.get(p))} in this config; use the same network (agent.hidden_sizes, "
                            f"agent.layer_norm, env) or load fewer sub-trees with agent.init_params")


def check_inputs(cfg) -> None:
    """What only the env and the init_from run can tell, as a UserError before anything is written:
    freeze / init_params names the network lacks; an init_from folder that is not a finished run
    of the same agent.kind; a loaded parameter whose shape differs."""
    a = cfg.agent
    if not (a.freeze or a.init_from):
        return
    shapes = _param_shapes(cfg)
    if a.init_from:
        _check_compatible(cfg, _param_shapes(_source_config(cfg)), shapes)


def load_params(cfg):
    """The final parameters of the run ``cfg.agent.init_from`` names, [its seeds, ...]."""
    from rlstop import evaluate

    _source_config(cfg)
    return evaluate.load(cfg.agent.init_from)[3].agent.params


def prepare(runner, cfgs):
    """The driver's hook after the batch state is initialised (rows: the configs' seeds in order,
    then any padding): the rows of each config with agent.init_from get that run's parameters,
    seed i from seed i mod n; the target parameters and the kept initial frozen parameters
    follow the new online ones. The optimizer states need no change: Adam's, AdamW's and SGD's
    start at zero whatever the parameters."""
    params, offset, loaded = runner.agent.params, 0, False
    for c in cfgs:
        n = c.train.seeds
        if c.agent.init_from:
            src = load_params(c)
            unbatched = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)  # noqa: E731
            _check_compatible(c, unbatched(src), unbatched(params))
            names = c.agent.init_params or names_of(params)
            rows = np.arange(n) % jax.tree.leaves(src)[0].shape[0]
            chosen, rest = split(params, names)
            chosen = jax.tree.map(
                lambda cur, new: jax.device_put(cur.at[offset:offset + n].set(np.asarray(new)[rows].astype(cur.dtype)),
                                                cur.sharding),
                chosen, select(src, names))
            params, loaded = merge(chosen, rest), True
        offset += n
    if not loaded:
        return runner
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731 - own buffers: the loop donates the state
    runner = runner.replace(agent=runner.agent.replace(params=params, target_params=copy(params)))
    if hasattr(runner, "frozen0"):
        runner = runner.replace(frozen0=copy(select(params, cfgs[0].agent.freeze)))
    return runner
