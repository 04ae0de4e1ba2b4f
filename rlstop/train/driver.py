"""The one path every run takes: a group of configs that share a compile, trained as one vmapped batch.

``rlstop train`` is a group of one config; a sweep is a list of groups. Within a group the batch
axis is (run, seed): every traced value (switches, learning rate, gamma, ...) is an array with
that leading axis, so one compiled function trains all of them at once.

The run is cut into chunks of whole evaluation periods; each chunk is one call of the same
compiled function, so metrics and the progress bar stream out between calls. The greedy
evaluation at the end of each period is a second compiled function, called after each chunk on
the parameters the chunk returns. It compiles in a second thread while the first chunk runs, so
a run starts training as soon as the chunk function is compiled.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import inspect
import threading
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from rlstop import config as config_lib
from rlstop.agents import scan as metric_scan
from rlstop.envs import make_env, resolve_backend
from rlstop.train import checkpoints, parallel, runtime
from rlstop.train.common import Program

LOOPS = {"dqn": "rlstop.train.offpolicy", "a2c": "rlstop.train.onpolicy", "ppo": "rlstop.train.onpolicy",
         "td": "rlstop.train.mdp"}


def agent_module(cfg):
    return importlib.import_module(config_lib.AGENT_MODULES[cfg.agent.kind])


def make_program(cfg, env, varying: frozenset = frozenset(), batch: int = 1) -> Program:
    """The loop module's program for ``cfg``. ``varying``: the traced values that differ across
    the batch; ``batch``: the number of runs trained together (over all devices), for loops
    that size their buffers by it. Loops take either, both or neither."""
    make = importlib.import_module(LOOPS[cfg.agent.kind]).make_program
    params = inspect.signature(make).parameters
    extra = {k: v for k, v in (("varying", varying), ("batch", batch)) if k in params}
    return make(cfg, env, **extra)


def loop_hook(cfg, name: str):
    """An optional function of the config's loop module (e.g. ``final_extras``, ``check_inputs``,
    ``prepare``), or None."""
    return getattr(importlib.import_module(LOOPS[cfg.agent.kind]), name, None)


def check_inputs(cfg) -> None:
    """Bad input that only the env or other runs' files reveal (e.g. ``agent.init_from``), as a
    UserError, before anything is written."""
    from rlstop.envs import check as check_env

    check_env(cfg)  # an unknown env id, an action space the agent cannot take
    check = loop_hook(cfg, "check_inputs")
    if check is not None:
        check(cfg)


def batch_hparams(cfgs) -> tuple[dict, dict]:
    """Traced values of every (run, seed) pair, and their vmap axes.

    A value that differs across the batch is stacked on a leading axis (vmap axis 0); a value
    that every run shares stays a scalar (axis None), so that branches on it remain real
    ``lax.cond``s under vmap. Either way it is a traced argument: one compile serves any value.
    """
    per_run = [agent_module(c).hparams(c.agent) for c in cfgs]
    reps = [c.train.seeds for c in cfgs]
    hp, axes = {}, {}
    for k in per_run[0]:
        vals = [np.asarray(p[k]) for p in per_run]
        if all(np.array_equal(v, vals[0]) for v in vals[1:]):
            hp[k], axes[k] = per_run[0][k], None
        else:
            hp[k], axes[k] = jnp.concatenate([jnp.repeat(p[k][None], r, 0) for p, r in zip(per_run, reps)]), 0
    return hp, axes


def varying_keys(axes: dict) -> frozenset:
    return frozenset(k for k, a in axes.items() if a == 0)


def batch_keys(cfgs) -> jax.Array:
    return jnp.stack([jax.random.PRNGKey(c.train.seed + i) for c in cfgs for i in range(c.train.seeds)])


def _divisor_near(n: int, target: int) -> int:
    """The divisor of n closest to target (chunks must tile the run exactly: one compile)."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: (abs(d - target), d))


@dataclass
class Layout:
    blocks_per_eval: int
    periods_per_chunk: int
    num_chunks: int
    steps_per_block: int

    @property
    def steps_per_chunk(self) -> int:
        return self.steps_per_block * self.blocks_per_eval * self.periods_per_chunk


def layout(cfg, program: Program, target_chunks: int = 20) -> Layout:
    """Chunks of whole evaluation periods that tile the run (and every checkpoint interval)
    exactly, about ``target_chunks`` of them. A function of the config alone, so a resumed run
    cuts its chunks where the interrupted one did."""
    t = cfg.train
    eval_every = t.eval_every or t.log_every
    blocks_per_eval = eval_every // program.steps_per_block
    periods = t.total_steps // eval_every
    tile = t.checkpoint_every // eval_every if t.checkpoint_every else periods
    per_chunk = _divisor_near(tile, max(1, round(periods / target_chunks)))
    return Layout(blocks_per_eval, per_chunk, periods // per_chunk, program.steps_per_block)


@dataclass
class GroupResult:
    """Metrics of a group, split back into runs."""

    cfgs: list
    metrics: list                # per run: DataFrame with seed, env_steps, metrics..., diverged
    diverged_step: list          # per run: [seeds] first env step flagged (or None)
    nonfinite: list              # per run: [seeds] bool
    wall_s: float
    compile_s: float
    env_steps_per_s: float
    compiles: int
    extras: list = field(default_factory=list)  # per run: dict of extra final values (e.g. weights)
    value_metric: str = ""       # the metric the divergence check reads
    bounds: list = field(default_factory=list)   # per run: its soft-divergence bound
    runner: object = None        # the final state of the whole batch (agents, buffers, envs, keys)
    resumed_from: int = 0        # env steps restored from a checkpoint (0: a fresh start)
    compile_cache_hits: int = 0  # executables loaded from the persistent compilation cache
    devices: int = 1             # devices the batch was split over
    eval_compile_s: float = 0.0  # the evaluation's compile (not in compile_s: it overlaps the first chunk)


def batched(fn, batch: int, in_axes):
    """vmap over the leading axis of the arguments whose axis is 0; for a batch of one, squeeze
    instead (vmap's batched matmuls cost more than plain ones on CPU)."""
    if batch > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def one(*args):
        squeezed = [jax.tree.map(lambda x: x[0], a) if ax == 0 else
                    (a if ax is None else {k: (v[0] if ax[k] == 0 else v) for k, v in a.items()})
                    for a, ax in zip(args, in_axes)]
        return jax.tree.map(lambda x: x[None], fn(*squeezed))

    return one


def lower_chunk(program: Program, lay: Layout, runner, hp, hp_axes, mesh=None):
    """The chunk function, traced and lowered for ``runner`` (arrays, or their ``ShapeDtypeStruct``s).

    Per evaluation period it returns the block metrics and what the evaluation reads: the
    parameters and the runner's key at the period's end (``None`` for programs without one).
    The evaluation itself is a function of its own (``lower_evaluate``), which derives its key
    from the runner's (``eval_key``): a random-number call there rather than in the chunk,
    whose first compile training waits for.

    Returns the lowered function and the metric names: the block metrics come out stacked
    (``rlstop.agents.scan``), one array per dtype and shape, ``unstack(arrays, names)`` on the
    host."""
    blocks_per_chunk = lay.blocks_per_eval * lay.periods_per_chunk
    groups = []  # the metric names, found when ``chunk`` is traced

    def chunk(runner, hp, c):
        def block(r, j):
            if program.timed:
                return program.block(r, hp, c * blocks_per_chunk + j)
            return program.block(r, hp)

        def stacked_block(r, j):
            r, m = block(r, j)
            m, groups[:] = metric_scan.stack(m)
            return r, m

        def period(runner, p):
            js = p * lay.blocks_per_eval + jnp.arange(lay.blocks_per_eval)
            runner, m = jax.lax.scan(stacked_block, runner, js)
            if program.evaluate is None:
                return runner, (m, None)
            return runner, (m, (runner.agent.params, runner.key))

        return jax.lax.scan(period, runner, jnp.arange(lay.periods_per_chunk))

    batch = jax.tree.leaves(runner)[0].shape[0]
    fn = batched(chunk, batch, (0, hp_axes, None))
    return _lower(fn, (runner, hp, jnp.zeros((), jnp.int32)), hp_axes, mesh, donate=True), groups


def eval_key(runner_key: jax.Array) -> jax.Array:
    """The key of the evaluation after a period, from the runner's key at the period's end."""
    return jax.random.fold_in(runner_key, 0x5EED)


def lower_evaluate(program: Program, inputs, hp, hp_axes, mesh=None):
    """The evaluation of a chunk's periods (all at once), traced and lowered for ``inputs``: the
    (parameters, runner key) per period that the chunk returns, [batch, periods, ...]."""
    def evaluate(inputs, hp):
        params, keys = inputs
        return jax.vmap(lambda p, k: program.evaluate(p, eval_key(k), hp))(params, keys)

    batch = jax.tree.leaves(inputs)[0].shape[0]
    return _lower(batched(evaluate, batch, (0, hp_axes)), (inputs, hp), hp_axes, mesh)


def _lower(fn, args, hp_axes, mesh, donate: bool = False):
    """``fn(batched, hp, *rest)`` jitted and lowered for ``args``. Over a mesh, the first argument
    and the output are split along the batch axis (as a pytree prefix), ``hp`` as
    ``parallel.hp_shardings`` says, and the rest replicated. ``donate``: the first argument's
    buffers are reused for the output."""
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
    split, whole = parallel.shardings(mesh)
    in_shardings = (split, parallel.hp_shardings(mesh, hp_axes)) + (whole,) * (len(args) - 2)
    return jax.jit(fn, donate_argnums=donate_argnums, in_shardings=in_shardings, out_shardings=split).lower(*args)


def _platform(mesh) -> str:
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def init_options(platform: str) -> dict | None:
    """The init function runs once: on CPU, XLA's older fusion emitters compile it in ~60% of the
    time of the default ones (CartPole DQN 0.59 -> 0.30-0.37 s, PPO 0.73-0.90 -> 0.46-0.59 s) and
    give the same state, bit for bit. The chunk keeps the default emitters unless
    ``$RLSTOP_FAST_COMPILE`` is on (``rlstop.train.runtime``): their code runs faster.

    Its LLVM code is also generated in one piece (``xla_cpu_parallel_codegen_split_count=1``),
    on one thread rather than on XLA's codegen pool: it compiles while ``run_group`` traces the
    chunk function, which is one thread's work, and a compile on every core slows that tracing.
    The same state, bit for bit."""
    return runtime.compiler_options(platform, always_fast=True, one_piece=True)


def run_group(cfgs: list, progress=None, ckpt_dir: str | None = None, compile_only: bool = False) -> GroupResult:
    """Train every config in ``cfgs`` (all sharing one static signature) as one vmapped batch.

    ``progress(done_steps, total_steps)`` is called after each chunk. With ``ckpt_dir``, the
    whole batch state and the metrics so far are saved there every ``train.checkpoint_every``
    env steps, and a run restarted with the same configs continues from the last one: chunks are
    cut at the same places and the state carries every key, so the result is the same as an
    uninterrupted run. ``compile_only`` stops after compiling (benchmarks of compile time): the
    result then has no metrics.
    """
    runtime.configure()
    if resolve_backend(cfgs[0].env) == "gymnasium":  # envs stepped on the host: the same agents, jitted
        from rlstop.train import host

        return host.run_group(cfgs, progress=progress)
    cfg0 = cfgs[0]
    if cfg0.train.x64:
        jax.config.update("jax_enable_x64", True)
    env = make_env(cfg0.env)
    hp, hp_axes = batch_hparams(cfgs)
    keys = batch_keys(cfgs)
    batch = keys.shape[0]
    # Over several devices (or processes): pad the batch to a multiple of the device count and
    # split it over a mesh; the extra rows are dropped below.
    mesh = parallel.batch_mesh(batch)
    padded = parallel.padded_size(batch, mesh)
    program = make_program(cfg0, env, varying_keys(hp_axes), padded)
    lay = layout(cfg0, program)
    keys, hp = parallel.pad(keys, hp, hp_axes, padded)
    keys, hp = parallel.place(keys, hp, hp_axes, mesh)
    multihost = jax.process_count() > 1

    t0 = time.perf_counter()
    hits0 = runtime.counts()["hits"]
    init_lowered = _lower(batched(program.init, keys.shape[0], (0, hp_axes)), (keys, hp), hp_axes, mesh)
    # XLA compiles without holding the GIL: the init function compiles in a second thread while
    # this one traces and lowers the chunk function for the runner's shapes (Python work).
    pool = concurrent.futures.ThreadPoolExecutor(1)
    init = pool.submit(init_lowered.compile, init_options(_platform(mesh)))
    chunk, metric_names = lower_chunk(program, lay, init_lowered.out_info, hp, hp_axes, mesh)
    init = init.result()
    runner = init(keys, hp)
    prepare = loop_hook(cfg0, "prepare")
    if prepare is not None:  # e.g. parameters from earlier runs (agent.init_from)
        runner = prepare(runner, cfgs)
    options = runtime.compiler_options(_platform(mesh))
    # The evaluation is lowered in the second thread while this one compiles the chunk (XLA holds
    # no GIL), then compiled there once the chunk is, while the first chunk runs: it is first
    # needed at that chunk's end, and compiling it alongside the chunk would slow the chunk's.
    chunk_done = threading.Event()
    chunk_ok = []

    def compile_evaluate():
        lowered = lower_evaluate(program, chunk.out_info[1][1], hp, hp_axes, mesh)
        chunk_done.wait()
        if not chunk_ok:
            return None, 0.0
        t = time.perf_counter()
        return lowered.compile(options), time.perf_counter() - t

    evaluate_future = pool.submit(compile_evaluate) if program.evaluate is not None else None

    def finish_evaluate_compile() -> float:
        """Close the second thread (done, or done soon: the chunk has compiled or failed) and
        return the evaluation's compile time."""
        pool.shutdown()
        return evaluate_future.result()[1] if evaluate_future else 0.0

    try:
        chunk = chunk.compile(options)
        chunk_ok.append(True)
    finally:
        chunk_done.set()
    compile_s = time.perf_counter() - t0
    if compile_only:
        eval_compile_s = finish_evaluate_compile()
        return GroupResult(cfgs, [], [], [], time.perf_counter() - t0, compile_s, 0.0, 1,
                           compile_cache_hits=runtime.counts()["hits"] - hits0, eval_compile_s=eval_compile_s)

    rows, evals, start_chunk = [], [], 0
    ckpt = checkpoints.GroupCheckpoint(ckpt_dir, cfgs) if ckpt_dir and not multihost else None
    if ckpt is not None:
        restored = ckpt.restore(runner)
        if restored is not None:
            runner, rows, evals, start_chunk = restored
    t_run = time.perf_counter()
    total = cfg0.train.total_steps
    every = cfg0.train.checkpoint_every
    if progress is not None and start_chunk:
        progress(start_chunk * lay.steps_per_chunk, total)
    evaluate = None
    for i in range(start_chunk, lay.num_chunks):
        runner, (m, ev_in) = chunk(runner, hp, jnp.asarray(i, jnp.int32))
        if evaluate_future is None:
            ev = jnp.zeros((batch, lay.periods_per_chunk))
        else:
            if evaluate is None:
                evaluate = evaluate_future.result()[0]
            ev = evaluate(ev_in, hp)
        m, ev = parallel.fetch((m, ev))
        m = metric_scan.unstack([np.asarray(v) for v in m], metric_names)
        rows.append({k: v[:batch].reshape(batch, -1) for k, v in m.items()})
        evals.append(np.asarray(ev)[:batch])
        done = (i + 1) * lay.steps_per_chunk
        if ckpt is not None and every and done % every == 0 and i + 1 < lay.num_chunks:
            ckpt.save(done, runner, rows, evals, i + 1)
        if progress is not None:
            progress(done, total)
    jax.block_until_ready(runner)
    run_s = time.perf_counter() - t_run
    eval_compile_s = finish_evaluate_compile()
    cache_hits = runtime.counts()["hits"] - hits0
    wall_s = time.perf_counter() - t0

    metrics = {k: np.concatenate([r[k] for r in rows], axis=1) for k in rows[0]} if rows else {}
    ev = np.concatenate(evals, axis=1) if evals else np.zeros((batch, 0))  # [B, periods]
    n_logs = next(iter(metrics.values())).shape[1]
    eval_col = np.full((batch, n_logs), np.nan)
    eval_col[:, lay.blocks_per_eval - 1::lay.blocks_per_eval] = ev
    if program.evaluate is not None:
        metrics["eval_return"] = eval_col
    steps = (np.arange(n_logs) + 1) * lay.steps_per_block

    extras_fn = getattr(importlib.import_module(LOOPS[cfg0.agent.kind]), "final_extras", None)
    extras_all = jax.tree.map(lambda x: np.asarray(x)[:batch], parallel.fetch(extras_fn(runner, env))) \
        if extras_fn else None
    # The final state, for checkpoints/final (one process: the whole batch on this host).
    final_runner = None if multihost else jax.tree.map(lambda x: x[:batch], runner)

    out_metrics, div_steps, nonfin, extras, bounds = [], [], [], [], []
    offset = 0
    for c in cfgs:
        sl = slice(offset, offset + c.train.seeds)
        offset += c.train.seeds
        bounds.append(value_bound(c, env))
        df, first, nf = run_table(c, {k: v[sl] for k, v in metrics.items()}, steps, program.value_metric, bounds[-1])
        out_metrics.append(df)
        div_steps.append(first)
        nonfin.append(nf)
        extras.append(jax.tree.map(lambda x: np.asarray(x)[sl], extras_all) if extras_all is not None else {})

    env_steps = (lay.num_chunks - start_chunk) * lay.steps_per_chunk * batch
    return GroupResult(cfgs, out_metrics, div_steps, nonfin, wall_s, compile_s,
                       env_steps / max(run_s, 1e-9), 1, extras, program.value_metric, bounds,
                       final_runner, start_chunk * lay.steps_per_chunk, cache_hits,
                       mesh.devices.size if mesh is not None else 1, eval_compile_s)


def run_table(cfg, m: dict, steps: np.ndarray, value_metric: str, bound: float):
    """One run's metrics.csv table from its metrics ([seeds, points] each), with the divergence
    check: (DataFrame, first diverged step per seed, non-finite per seed). Shared by every loop."""
    div, first, nonfinite = detect_divergence(m[value_metric], steps, bound)
    m = {**m, "diverged": div.astype(np.int64)}
    frames = []
    for j in range(cfg.train.seeds):
        d = {"seed": np.full(len(steps), cfg.train.seed + j), "env_steps": steps}
        d.update({k: v[j] for k, v in m.items()})
        frames.append(pd.DataFrame(d))
    df = pd.concat(frames, ignore_index=True)
    lead = [c for c in ("seed", "env_steps", "episode_return", "eval_return") if c in df.columns]
    return df[lead + [k for k in df.columns if k not in lead]], first, nonfinite


def value_bound(cfg, env) -> float:
    """Soft-divergence bound r_max / (1 - gamma) (van Hasselt et al. 2018); inf when gamma = 1."""
    gamma = getattr(cfg.agent, "gamma", None)
    if gamma is None:
        gamma = float(getattr(env, "gamma", 1.0))
    r_max = getattr(env, "reward_bound", 1.0)
    return float("inf") if gamma >= 1.0 else r_max / (1.0 - gamma)


# An estimate must exceed the soft bound by more than this fraction to count as diverged: on
# CartPole (gamma 0.99, bootstrapping through truncation) a perfect policy is worth exactly
# r_max / (1 - gamma) = 100, and a converged critic sits at 100.0x.
SOFT_BOUND_TOLERANCE = 0.01


def detect_divergence(values: np.ndarray, steps: np.ndarray, bound: float):
    """Per seed: sticky diverged flag per logging point, the first step flagged, whether non-finite.

    values: [seeds, points] magnitude of the value estimates (e.g. q_max_abs). A seed diverges at
    the first point where that magnitude is non-finite or above ``bound`` (by more than
    ``SOFT_BOUND_TOLERANCE``).
    """
    values = np.asarray(values, dtype=np.float64)
    bad_nonfinite = ~np.isfinite(values)
    with np.errstate(invalid="ignore"):
        bad = bad_nonfinite | (np.abs(values) > bound * (1.0 + SOFT_BOUND_TOLERANCE))
    sticky = np.maximum.accumulate(bad, axis=1) if bad.size else bad
    first = [int(steps[np.argmax(row)]) if row.any() else None for row in bad]
    nonfinite = bad_nonfinite.any(axis=1).tolist()
    return sticky, first, nonfinite
