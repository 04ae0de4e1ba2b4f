"""Grid expansion, grouping by static signature, execution with resume.

A sweep file (DESIGN.md)::

    base: configs/dqn_cartpole.yaml
    name: dqn_cartpole_switches
    grid:
      agent.stop_gradient_target: [true, false]
      agent.target_network: [true, false]
    set:
      train.seeds: 8

Runs that differ only in traced values share a static signature and form one group: one compile,
one vmapped call over (runs x seeds). ``sweep.json`` records every run, its group and status;
running the same command again skips every finished run.
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass

import jax
import numpy as np

from rlstop import config as config_lib
from rlstop import results
from rlstop.errors import UserError


@dataclass(frozen=True)
class Run:
    name: str
    cfg: config_lib.RunConfig
    overrides: dict  # the grid values that made this run (dotted keys)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    return str(v)


def run_name(overrides: dict) -> str:
    if not overrides:
        return "baseline"
    return ",".join(f"{k.split('.', 1)[-1]}={_fmt(v)}" for k, v in overrides.items())


def expand_grid(base: config_lib.RunConfig, grid: dict) -> list[Run]:
    """Cartesian product of the grid's values, each applied to ``base`` (validated)."""
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise UserError(f"grid.{k} must be a non-empty list of values, e.g. [true, false]")
    keys = list(grid)
    runs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        ov = dict(zip(keys, combo))
        runs.append(Run(run_name(ov), config_lib.replace(base, ov), ov))
    return runs


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs with the same static signature, in first-appearance order."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(config_lib.static_signature(r.cfg), []).append(r)
    return list(groups.values())


def load_sweep(path: str, overrides: list[str]) -> tuple[str, list[Run]]:
    data = config_lib._read_yaml(path)
    allowed = {"base", "name", "grid", "set"}
    unknown = set(data) - allowed
    if unknown:
        raise UserError(f"unknown key {sorted(unknown)[0]!r} in sweep file {path}; valid keys: base, name, grid, set")
    if "base" not in data:
        raise UserError(f"sweep file {path} has no 'base': give the path of a run config, e.g. base: configs/dqn_cartpole.yaml")
    base_path = data["base"]
    if not os.path.isabs(base_path) and not os.path.exists(base_path):
        alt = os.path.join(os.path.dirname(path), base_path)
        base_path = alt if os.path.exists(alt) else base_path
    sets = [f"{k}={_yaml_value(v)}" for k, v in (data.get("set") or {}).items()]
    base = config_lib.load_config(base_path, sets + list(overrides))
    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise UserError(f"'grid' in {path} must map dotted keys to lists of values")
    return str(name), expand_grid(base, grid)


def _yaml_value(v) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


# ---------------------------------------------------------------------------------------------
# execution


def summarise(run: Run, res, i: int) -> dict:
    """summary.json of run i of a group result."""
    df = res.metrics[i]
    cfg = run.cfg
    final = {}
    for col in df.columns:
        if col in ("seed", "env_steps"):
            continue
        per_seed = []
        for _, g in df.groupby("seed", sort=True):
            vals = g[col].to_numpy(dtype=np.float64)
            fin = vals[~np.isnan(vals)] if col == "eval_return" or col == "episode_return" else vals
            per_seed.append(float(fin[-1]) if len(fin) else float("nan"))
        arr = np.asarray(per_seed)
        mean = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
        final[col] = {"mean": mean, "per_seed": per_seed}
    for k, v in (res.extras[i] or {}).items():
        v = np.asarray(v)
        final[k] = {"mean": v.mean(axis=0), "per_seed": v}
    diverged_steps = res.diverged_step[i]
    n_div = sum(s is not None for s in diverged_steps)
    status = "diverged" if n_div else "completed"
    return {
        "name": run.name,
        "status": status,
        "seeds": [cfg.train.seed + j for j in range(cfg.train.seeds)],
        "final": final,
        "diverged": {"fraction": n_div / cfg.train.seeds, "step": diverged_steps, "nonfinite": res.nonfinite[i],
                     "value_metric": res.value_metric, "bound": res.bounds[i] if res.bounds else None,
                     "peak": _peak(df, res.value_metric)},
        "overrides": run.overrides,
        "wall_s": res.wall_s,
        "compile_s": res.compile_s,
        "eval_compile_s": res.eval_compile_s,
        "compile_cache_hits": res.compile_cache_hits,
        "env_steps_per_s": res.env_steps_per_s,
        "batch": sum(c.train.seeds for c in res.cfgs),
        "devices": res.devices,
        "versions": results.versions(),
    }


def _peak(df, metric: str):
    """Per seed: the largest magnitude of the divergence metric; None (JSON) once it was non-finite."""
    if metric not in df.columns:
        return None
    out = []
    for _, g in df.groupby("seed", sort=True):
        v = g[metric].to_numpy(dtype=np.float64)
        out.append(float(np.max(np.abs(v))) if np.isfinite(v).all() else float("inf"))
    return out


def write_tensorboard(directory: str, df) -> None:
    """TensorBoard event files, one folder per seed (``tensorboard --logdir OUT``)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UserError('train.tensorboard=true needs tensorboardX: pip install "rlstop[tensorboard]"') from None
    for seed, g in df.groupby("seed", sort=True):
        with SummaryWriter(os.path.join(directory, f"seed{seed}")) as w:
            for row in g.itertuples(index=False):
                for k, v in row._asdict().items():
                    if k not in ("seed", "env_steps") and v == v:  # skip NaN (not logged at that point)
                        w.add_scalar(k, float(v), int(row.env_steps))


def write_run(run_dir: str, run: Run, res, i: int, offset: int) -> dict:
    from rlstop.train import checkpoints

    os.makedirs(run_dir, exist_ok=True)
    results.atomic_write(os.path.join(run_dir, "config.yaml"), config_lib.to_yaml(run.cfg))
    if res.runner is not None:
        n = run.cfg.train.seeds
        checkpoints.save_final(os.path.join(run_dir, "checkpoints", "final"),
                               jax.tree.map(lambda x: x[offset:offset + n], res.runner))
    results.write_metrics(os.path.join(run_dir, "metrics.csv"), res.metrics[i])
    if run.cfg.train.tensorboard:
        write_tensorboard(os.path.join(run_dir, "tensorboard"), res.metrics[i])
    summary = summarise(run, res, i)
    results.write_json(os.path.join(run_dir, "summary.json"), summary)  # last: marks the run finished
    return summary


class Reporter:
    """Progress bar with env steps/s (rich); quiet when ``enabled`` is False."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int, batch: int):
        if self._progress is None:
            return lambda done, total: None
        tid = self._progress.add_task(description, total=total, rate="compiling...")
        start = [None]

        def update(done: int, total_: int):
            now = time.perf_counter()
            if start[0] is None:
                start[0] = (now, 0)
                rate = ""
            else:
                t0, d0 = start[0]
                rate = f"{(done - d0) * batch / max(now - t0, 1e-9):,.0f} env steps/s"
            self._progress.update(tid, completed=done, rate=rate)

        return update

    def print(self, msg: str):
        if self._progress is not None:
            self._progress.console.print(msg)
        else:
            print(msg, flush=True)


def execute(runs: list[Run], out_root: str, sweep_name: str | None = None, show_progress: bool = True,
            log=print, jobs: int = 1) -> list[dict]:
    """Train every unfinished run (grouped by static signature) and write its run folder.

    With ``sweep_name``, runs live in ``out_root/sweep_name/<run>`` and ``sweep.json`` there
    tracks them; without, a single run lives in ``out_root/<name>``. ``jobs > 1`` trains that
    many static groups side by side in separate processes.
    """
    root = os.path.join(out_root, sweep_name) if sweep_name else out_root
    from rlstop.train import driver

    for r in runs:  # input errors that need the env or other runs' files, before anything is written
        if not results.is_complete(os.path.join(root, r.name)):
            driver.check_inputs(r.cfg)
    groups = group_runs(runs)
    sweep_path = os.path.join(root, "sweep.json") if sweep_name else None
    state = {"name": sweep_name, "runs": {}, "groups": []}
    if sweep_path and os.path.isfile(sweep_path):
        state = results.read_json(sweep_path)
    summaries = {}

    from rlstop.train import parallel

    main = parallel.is_main_process()  # under jax.distributed, every process trains, process 0 writes

    def save_state():
        if sweep_path and main:
            results.write_json(sweep_path, state)

    for gi, group in enumerate(groups):
        for r in group:
            entry = state["runs"].get(r.name, {})
            entry.update({"group": gi, "overrides": r.overrides,
                          "status": entry.get("status", "pending") if results.is_complete(os.path.join(root, r.name)) else "pending"})
            state["runs"][r.name] = entry
    save_state()

    # What is left to do, decided once before any training (every process decides the same).
    todos = [[r for r in group if not results.is_complete(os.path.join(root, r.name))] for group in groups]
    for gi, group in enumerate(groups):
        for r in group:
            if r not in todos[gi]:
                summaries[r.name] = results.read_json(os.path.join(root, r.name, "summary.json"))
                state["runs"][r.name]["status"] = summaries[r.name]["status"]

    def record(gi: int, done: dict, info: dict) -> None:
        summaries.update(done)
        for name, s in done.items():
            state["runs"][name].update({"status": s["status"], "compile_s": s["compile_s"], "wall_s": s["wall_s"]})
        state["groups"].append({"group": gi, **info})
        save_state()

    pending = [gi for gi in range(len(groups)) if todos[gi]]
    if jobs > 1 and len(pending) > 1 and main and jax.process_count() == 1:
        # Static groups side by side, each in its own process (each compiles its own function).
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_train_group, root, todos[gi], gi, False): gi for gi in pending}
            for fut in cf.as_completed(futures):
                done, info = fut.result()
                record(futures[fut], done, info)
                for name in info["runs"]:
                    log(_one_line(summaries[name], os.path.join(root, name)))
        return [summaries.get(r.name) for r in runs]

    with Reporter(show_progress and main) as rep:
        for gi in pending:
            done, info = _train_group(root, todos[gi], gi, rep)
            if main:
                record(gi, done, info)
                for name in info["runs"]:
                    rep.print(_one_line(summaries[name], os.path.join(root, name)))
    return [summaries.get(r.name) for r in runs]


def _train_group(root: str, todo: list[Run], gi: int, rep) -> tuple[dict, dict]:
    """Train one group of runs that share a compile; write their folders (process 0 only).

    Returns the summaries by run name and the group's entry for sweep.json."""
    from rlstop.train import parallel
    from rlstop.train.driver import run_group

    main = parallel.is_main_process()
    rep = rep or Reporter(False)
    batch = sum(r.cfg.train.seeds for r in todo)
    label = todo[0].name if len(todo) == 1 else f"group {gi} ({len(todo)} runs)"
    update = rep.task(f"{label} x{batch}", todo[0].cfg.train.total_steps, batch)
    for r in todo if main else ():  # the resolved config first: a killed run is recognised on the rerun
        results.atomic_write(os.path.join(root, r.name, "config.yaml"), config_lib.to_yaml(r.cfg))
    ckpt_dir = (os.path.join(root, todo[0].name, "checkpoints", "latest") if len(todo) == 1 else
                os.path.join(root, ".checkpoints", "group-" + "-".join(sorted(r.name for r in todo))[:80]))
    res = run_group([r.cfg for r in todo], progress=update, ckpt_dir=ckpt_dir)
    if res.resumed_from:
        rep.print(f"resumed {label} from its checkpoint at {res.resumed_from:,} env steps")
    done = {}
    if main:
        offset = 0
        for i, r in enumerate(todo):
            done[r.name] = write_run(os.path.join(root, r.name), r, res, i, offset)
            offset += r.cfg.train.seeds
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    info = {"runs": [r.name for r in todo], "compiles": res.compiles, "batch": batch, "compile_s": res.compile_s,
            "wall_s": res.wall_s, "resumed_from": res.resumed_from}
    return done, info


def _one_line(s: dict, path: str) -> str:
    ev = s["final"].get("eval_return", {}).get("mean")
    ret = s["final"].get("episode_return", {}).get("mean")
    parts = [f"{s['name']}: {s['status']}"]
    if ev is not None:
        parts.append(f"eval_return {ev:.1f}")
    elif ret is not None:
        parts.append(f"episode_return {ret:.1f}")
    parts.append(f"{s['env_steps_per_s']:,.0f} env steps/s, compile {s['compile_s']:.1f}s, wall {s['wall_s']:.1f}s")
    parts.append(f"-> {path}")
    return ", ".join(parts)


def ablation_runs(cfg: config_lib.RunConfig) -> list[Run]:
    """The standard grid for an agent: the baseline, each switch that is on turned off alone, and
    all of them off together. Switches are traced, so every run but a static one (layer_norm)
    shares one compile."""
    switches = [s for s in type(cfg.agent).SWITCHES if getattr(cfg.agent, s) is True]
    if not switches:
        raise UserError(f"{cfg.agent.kind}: no switch is on in this config, so there is nothing to ablate; "
                        f"its switches are {', '.join(type(cfg.agent).SWITCHES)}")
    variants: list[dict] = [{}]
    variants += [{f"agent.{s}": False} for s in switches]
    if len(switches) > 1:
        variants.append({f"agent.{s}": False for s in switches})
    return [Run(run_name(ov), config_lib.replace(cfg, ov), ov) for ov in variants]
