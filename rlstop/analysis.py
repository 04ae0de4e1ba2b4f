"""Aggregation across seeds, divergence summaries, figures and tables for `rlstop compare`.

Statistics follow Agarwal et al. 2021 (rliable): the interquartile mean (IQM) of final returns
with a 95% percentile-bootstrap confidence interval, and mean curves with 95% bootstrap bands
over seeds. The bootstrap is scipy's.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from rlstop import results
from rlstop.errors import UserError

LOG_METRICS = ("q_max_abs", "value_max_abs", "w_norm")
NOT_PLOTTED = ("seed", "env_steps", "diverged")
RETURN_PREFERENCE = ("eval_return", "episode_return", "rmsve", "w_norm")
CI = 0.95
N_RESAMPLES = 2000


def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% (scipy's 25%-trimmed mean)."""
    return stats.trim_mean(x, 0.25, axis=axis)


def bootstrap_ci(x: np.ndarray, statistic=np.mean, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high) of ``statistic`` over the finite values of x, 95% percentile bootstrap."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return (np.nan, np.nan, np.nan)
    point = float(statistic(x))
    if len(x) < 2 or np.all(x == x[0]):
        return (point, point, point)
    res = stats.bootstrap((x,), statistic, confidence_level=CI, n_resamples=N_RESAMPLES, method="percentile",
                          rng=np.random.default_rng(seed), vectorized=False)
    return (point, float(res.confidence_interval.low), float(res.confidence_interval.high))


def curve_band(values: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds and 95% bootstrap band at each logging point. values: [seeds, points];
    non-finite entries (diverged seeds) are left out of that point's statistics."""
    values = np.asarray(values, np.float64)
    seeds, points = values.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, seeds, size=(N_RESAMPLES, seeds))
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    # A point no seed has a finite value at (all diverged) is NaN, without numpy's warnings.
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        mean = v.sum(0) / finite.sum(0)
        boot = v[idx].sum(1) / finite[idx].sum(1)  # [resamples, points]
        lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0) if seeds > 1 else (mean, mean)
    return mean, lo, hi


def divergence(summary: dict, df: pd.DataFrame) -> dict:
    """Divergence per seed by the current rule (``rlstop.train.driver.detect_divergence``),
    re-derived from the recorded value metric and bound, so that tables of older runs follow the
    same rule as new ones. Falls back to the summary when the metric was not recorded."""
    from rlstop.train.driver import detect_divergence

    div = dict(summary.get("diverged", {}))
    metric, bound = div.get("value_metric"), div.get("bound")
    if metric in df.columns and bound:
        steps, vals = pivot(df, metric)
        _, first, nonfinite = detect_divergence(vals, steps, float(bound))
        div.update(step=first, nonfinite=nonfinite,
                   fraction=sum(s is not None for s in first) / max(len(first), 1))
    return div


def collect(dirs: list[str]) -> dict[str, tuple[dict, pd.DataFrame]]:
    """label -> (summary, metrics) for every finished run under the given run or sweep folders."""
    runs: dict[str, tuple[dict, pd.DataFrame]] = {}
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(f"{d!r} is not a folder; give run or sweep folders written by rlstop")
        if os.path.isfile(os.path.join(d, "summary.json")):
            found = [d]
        else:
            found = sorted(os.path.join(d, x) for x in os.listdir(d) if results.is_complete(os.path.join(d, x)))
            if not found:
                raise UserError(f"{d} holds no finished run (no */summary.json); train or resume it first")
        prefix = os.path.basename(os.path.normpath(d)) + "/" if len(dirs) > 1 and len(found) > 1 else ""
        for rd in found:
            summary, df = results.load_run(rd)
            runs[prefix + summary["name"]] = (summary, df)
    return runs


def pivot(df: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(env_steps [points], values [seeds, points])."""
    p = df.pivot(index="seed", columns="env_steps", values=metric)
    return p.columns.to_numpy(), p.to_numpy(np.float64)


def return_metric(df: pd.DataFrame) -> str:
    for m in RETURN_PREFERENCE:
        if m in df.columns and df[m].notna().any():
            return m
    raise UserError("these runs have no return or value metric to tabulate")


def table(runs: dict) -> pd.DataFrame:
    rows = []
    for label, (summary, df) in runs.items():
        metric = return_metric(df)
        steps, vals = pivot(df, metric)
        final = np.array([row[np.isfinite(row)][-1] if np.isfinite(row).any() else np.nan for row in vals])
        with np.errstate(invalid="ignore"):
            auc = np.nanmean(np.where(np.isfinite(vals), vals, np.nan), axis=1)
        point, lo, hi = bootstrap_ci(final, statistic=lambda x: iqm(x))
        div = divergence(summary, df)
        div_steps = [s for s in div.get("step", []) if s is not None]
        nonfinite = div.get("nonfinite", [])
        bound = div.get("bound")
        peaks = div.get("peak") or []
        peak_ratio = (max(np.inf if p is None else p for p in peaks) / bound) if peaks and bound else np.nan
        rows.append({
            "variant": label,
            "metric": metric,
            "seeds": len(final),
            "final_iqm": point, "ci_low": lo, "ci_high": hi,
            "auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else np.nan,
            "diverged_fraction": div.get("fraction", 0.0),
            "nonfinite_fraction": (sum(bool(x) for x in nonfinite) / len(nonfinite)) if nonfinite else 0.0,
            "median_diverged_step": float(np.median(div_steps)) if div_steps else np.nan,
            "peak_over_bound": peak_ratio,
        })
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    head = ("| variant | metric | seeds | final IQM [95% CI] | AUC | diverged (soft or non-finite) | non-finite "
            "| median step diverged | peak value / bound |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in df.itertuples():
        ci = f"{r.final_iqm:.4g} [{r.ci_low:.4g}, {r.ci_high:.4g}]" if np.isfinite(r.final_iqm) else "n/a (all non-finite)"
        when = f"{r.median_diverged_step:,.0f}" if np.isfinite(r.median_diverged_step) else "-"
        peak = "-" if not np.isfinite(r.peak_over_bound) and np.isnan(r.peak_over_bound) else (
            "non-finite" if not np.isfinite(r.peak_over_bound) else f"{r.peak_over_bound:.3g}")
        lines.append(f"| {r.variant} | {r.metric} | {r.seeds} | {ci} | {r.auc:.4g} | {r.diverged_fraction:.0%} "
                     f"| {r.nonfinite_fraction:.0%} | {when} | {peak} |")
    return head + "\n".join(lines) + "\n"


def plot_metric(runs: dict, metric: str, path: str, title: str = "") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    drawn, seen, bounds = False, [], set()
    for i, (label, (summary, df)) in enumerate(runs.items()):
        if metric not in df.columns or not df[metric].notna().any():
            continue
        steps, vals = pivot(df, metric)
        mean, lo, hi = curve_band(vals, seed=i)
        ok = np.isfinite(mean)
        color = f"C{i % 10}"
        div = divergence(summary, df)
        n_div = sum(s is not None for s in div.get("step", []))
        lab = label + (f"  ({n_div}/{vals.shape[0]} seeds diverged)" if n_div else "")
        # A variant whose curve equals an earlier one exactly (e.g. a switch that changes nothing
        # in this configuration) is drawn dashed and says so, instead of hiding under it.
        twin = next((name for name, v in seen if v.shape == vals.shape and np.array_equal(v, vals, equal_nan=True)), None)
        if twin is not None:
            lab += f"  (identical to {twin})"
        seen.append((label, vals))
        ax.plot(steps[ok], mean[ok], color=color, label=lab, lw=1.6, ls="--" if twin else "-")
        ax.fill_between(steps[ok], lo[ok], hi[ok], color=color, alpha=0.2, lw=0)
        if div.get("value_metric") == metric and div.get("bound"):
            bounds.add(float(div["bound"]))
        drawn = drawn or bool(ok.any())
    for b in sorted(bounds):
        ax.axhline(b, color="k", ls=":", lw=1, label=f"soft-divergence bound r_max/(1-gamma) = {b:g}")
    if not drawn:
        plt.close(fig)
        return False
    if metric in LOG_METRICS:
        ax.set_yscale("log")
    ax.set_xlabel("env steps" if "return" in metric or metric.startswith(("q_", "loss")) else "env steps (updates for DP)")
    ax.set_ylabel(metric + (" (log scale)" if metric in LOG_METRICS else ""))
    ax.set_title(title or f"{metric}: mean over seeds, 95% bootstrap CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def compare(dirs: list[str], out: str | None = None, metric: str | None = None, log=print) -> dict:
    """Figures (one PNG per metric) and tables (markdown, CSV) for the runs under ``dirs``."""
    runs = collect(dirs)
    all_metrics = []
    for _, df in runs.values():
        all_metrics += [c for c in df.columns if c not in NOT_PLOTTED and c not in all_metrics
                        and not c.startswith(("value_s", "w")) or c == "w_norm" and c not in all_metrics]
    if metric is not None and metric not in all_metrics:
        import difflib

        close = difflib.get_close_matches(metric, all_metrics, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"no metric {metric!r} in these runs; {hint}available: {', '.join(all_metrics)}")
    if out is not None and out.endswith(".png"):
        fig_dir, single = os.path.dirname(out) or ".", out
    else:
        fig_dir, single = out or os.path.join(dirs[0], "compare"), None
    def _name(d: str) -> str:  # results/<name>/runs -> <name>
        d = os.path.normpath(d)
        return os.path.basename(os.path.dirname(d)) if os.path.basename(d) == "runs" else os.path.basename(d)

    title_base = ", ".join(_name(d) for d in dirs)
    written = []
    for m in ([metric] if metric else all_metrics):
        path = single or os.path.join(fig_dir, f"{m}.png")
        if plot_metric(runs, m, path, title=f"{title_base}: {m} (mean, 95% bootstrap CI over seeds)"):
            written.append(path)
    tab = table(runs)
    tab_dir = os.path.dirname(single) if single else fig_dir
    results.atomic_write(os.path.join(tab_dir, "table.csv"), tab.to_csv(index=False, float_format="%.6g"))
    md = markdown(tab)
    results.atomic_write(os.path.join(tab_dir, "table.md"), md)
    log(md.rstrip())
    log(f"figures: {', '.join(written)}")
    log(f"tables: {os.path.join(tab_dir, 'table.md')}, {os.path.join(tab_dir, 'table.csv')}")
    return {"figures": written, "table": tab}
