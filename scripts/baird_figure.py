"""Sutton & Barto (2nd ed.) Figure 11.2, Baird's counterexample, from rlstop's own runs.

Trains configs/baird.yaml through rlstop's sweep path (the one ``rlstop sweep`` takes) on a 2 x 2
grid -- agent.update in {sampled, expected} x agent.stop_gradient_target in {true, false} -- for
5000 steps (sampled: transitions, one per update; expected: DP sweeps), then draws the eight
weight components over the first 1000 steps (the book's axes) and writes

    results/baird/figure_11_2.png   top row: the book's two panels (semi-gradient off-policy
                                    TD(0), semi-gradient DP); bottom row: the same with the
                                    residual gradient (no stop-gradient on the target)
    results/baird/README.md         the command, what the figure shows, ||w|| at 1000/2000/5000

Usage:  python scripts/baird_figure.py [--out runs] [--seeds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rlstop import config as config_lib  # noqa: E402
from rlstop import sweep  # noqa: E402
from rlstop.envs import mdp as mdp_lib  # noqa: E402

SWEEP = "baird_figure"
STEPS = 5000
PLOT_STEPS = 1000
CHECKPOINTS = (1000, 2000, 5000)
VARIANTS = [  # (run name, update, stop_gradient_target, panel title)
    ("update=sampled,stop_gradient_target=true", "sampled", True, "Semi-gradient off-policy TD(0)"),
    ("update=expected,stop_gradient_target=true", "expected", True, "Semi-gradient DP (expected update)"),
    ("update=sampled,stop_gradient_target=false", "sampled", False, "Residual-gradient off-policy TD(0)"),
    ("update=expected,stop_gradient_target=false", "expected", False, "Residual-gradient DP (expected update)"),
]


def run(out: str, seeds: int) -> str:
    base = config_lib.load_config("configs/baird.yaml", [f"train.total_steps={STEPS}", "train.log_every=10",
                                                        f"train.seeds={seeds}", f"name={SWEEP}"])
    runs = sweep.expand_grid(base, {"agent.update": ["sampled", "expected"],
                                    "agent.stop_gradient_target": [True, False]})
    sweep.execute(runs, out, SWEEP, show_progress=False)
    return os.path.join(out, SWEEP)


def load(root: str, name: str) -> tuple[pd.DataFrame, dict]:
    df = pd.read_csv(os.path.join(root, name, "metrics.csv"))
    with open(os.path.join(root, name, "summary.json")) as f:
        return df, json.load(f)


def figure(root: str, path: str) -> None:
    w0 = mdp_lib.baird().initial_weights
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    colors = plt.cm.tab10(np.arange(8))
    for ax, (name, update, _, title) in zip(axes.flat, VARIANTS):
        df, _ = load(root, name)
        d = df[(df.seed == df.seed.min()) & (df.env_steps <= PLOT_STEPS)]
        steps = np.concatenate([[0], d.env_steps.to_numpy()])
        for i in range(8):
            ax.plot(steps, np.concatenate([[w0[i]], d[f"w{i}"].to_numpy()]), color=colors[i], lw=1.6,
                    label=f"$w_{i + 1}$")
        ax.set_title(title + ("" if update == "expected" else " (seed 0)"), fontsize=11)
        ax.axhline(0, color="0.7", lw=0.6, zorder=0)
        ax.grid(alpha=0.25)
        ax.set_xlim(0, PLOT_STEPS)
    axes[1, 0].set_xlabel("Steps")
    axes[1, 1].set_xlabel("Sweeps")
    axes[0, 0].set_ylabel("weights (stop-gradient on the target)")
    axes[1, 0].set_ylabel("weights (residual gradient)")
    axes[0, 1].legend(loc="upper left", ncol=2, fontsize=9, frameon=False)
    fig.suptitle("Baird's counterexample (S&B Figure 11.2): alpha 0.01, gamma 0.99, "
                 "w0 = (1,1,1,1,1,1,10,1)", fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def numbers(root: str) -> list[dict]:
    rows = []
    for name, update, sg, title in VARIANTS:
        df, summary = load(root, name)
        row = {"variant": title, "update": update, "stop_gradient_target": sg, "status": summary["status"],
               "diverged_step": summary["diverged"]["step"]}
        for t in CHECKPOINTS:
            w = df[df.env_steps == t].w_norm.to_numpy()
            row[t] = (float(np.median(w)), float(w.min()), float(w.max()))
        d0 = df[(df.seed == df.seed.min()) & (df.env_steps == PLOT_STEPS)]
        row["w_at_1000_seed0"] = [float(d0[f"w{i}"].iloc[0]) for i in range(8)]
        row["rmsve_at_5000"] = float(np.median(df[df.env_steps == STEPS].rmsve))
        rows.append(row)
    return rows


def residual_curvature() -> tuple[float, float, float]:
    """Smallest positive and largest eigenvalue of the expected residual-gradient loss's Hessian
    on Baird's example, and the norm of w0's component in the null space of the features."""
    m = mdp_lib.baird()
    x, gamma = m.features, float(m.gamma)
    d = x - gamma * x[6]                      # x(s) - gamma x(7): every update goes to state 7
    lam, vecs = np.linalg.eigh(d.T @ d / 7)
    positive = lam[lam > 1e-12]
    null = vecs[:, np.abs(lam) <= 1e-12]
    return float(positive.min()), float(positive.max()), float(np.linalg.norm(null.T @ m.initial_weights))


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def readme(rows: list[dict], seeds: int, path: str) -> None:
    w0 = float(np.linalg.norm(mdp_lib.baird().initial_weights))
    lines = [
        "# Baird's counterexample: semi-gradient vs residual-gradient TD (S&B Figure 11.2)",
        "",
        "Reproduce (about 10 s on a 2-core CPU):",
        "",
        "```",
        f"python scripts/baird_figure.py --out runs --seeds {seeds}",
        "```",
        "",
        "It trains `configs/baird.yaml` (the book exactly: alpha 0.01, gamma 0.99, "
        "w0 = (1,1,1,1,1,1,10,1), behaviour dashed 6/7 / solid 1/7, target always solid, all rewards 0, "
        f"float64) through rlstop's sweep path on the grid `agent.update` x `agent.stop_gradient_target`, "
        f"{STEPS} steps, {seeds} seeds; the same runs one at a time are e.g.",
        "`rlstop train configs/baird.yaml agent.update=expected agent.stop_gradient_target=false`.",
        "",
        "![Figure 11.2](figure_11_2.png)",
        "",
        "`figure_11_2.png`: the eight weight components over the first 1000 steps (sampled: one "
        "transition per update, seed 0) or sweeps (expected/DP update, deterministic). Top row: the book's "
        "two panels, semi-gradient TD with the target detached. Bottom row: the same two updates with the "
        "stop-gradient removed (residual gradient, Baird 1995).",
        "",
        f"||w|| (start: {w0:.4g}); sampled: median [min, max] over {seeds} seeds:",
        "",
        "| variant | " + " | ".join(f"step {t}" for t in CHECKPOINTS) + " | rmsve at 5000 | status |",
        "|---|" + "---|" * (len(CHECKPOINTS) + 2),
    ]
    for r in rows:
        cells = []
        for t in CHECKPOINTS:
            med, lo, hi = r[t]
            cells.append(_fmt(med) if r["update"] == "expected" else f"{_fmt(med)} [{_fmt(lo)}, {_fmt(hi)}]")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {_fmt(r['rmsve_at_5000'])} | {r['status']} |")
    semi_s, semi_e, res_s, res_e = rows
    lam_min, lam_max, null = residual_curvature()
    g = lambda r: (r[5000][0] / r[1000][0]) ** (1 / 4)  # noqa: E731  per 1000 steps, 1000 -> 5000
    lines += [
        "",
        "What the runs show:",
        "",
        f"- With the target detached both updates diverge, as in the book: ||w|| is {_fmt(semi_s[1000][0])} "
        f"(sampled, median) and {_fmt(semi_e[1000][0])} (expected) after 1000 steps and then grows "
        f"about {g(semi_s):.1f}x (sampled) / {g(semi_e):.1f}x (expected) per further 1000 steps. "
        f"Every seed crosses the soft-divergence bound r_max / (1 - gamma) = 100 (|v(s)| > 100; r_max is "
        f"floored at 1 because every reward is 0) at step {min(s for s in semi_s['diverged_step'] if s)}-"
        f"{max(s for s in semi_s['diverged_step'] if s)} (sampled) and {semi_e['diverged_step'][0]} (expected).",
        "- Seed 0, sampled, weights at step 1000: ("
        + ", ".join(f"{x:.1f}" for x in semi_s["w_at_1000_seed0"]) + "); expected: ("
        + ", ".join(f"{x:.1f}" for x in semi_e["w_at_1000_seed0"]) + ").",
        f"- Without the stop-gradient (residual gradient) neither update diverges: ||w|| drops from "
        f"{w0:.4g} to {_fmt(res_s[1000][0])} within a few hundred steps, where the TD errors of the "
        f"six upper states are ~0 (v(s) = gamma v(7)), and then barely moves ({_fmt(res_s[5000][0])} at "
        f"step 5000); rmsve (v_pi = 0 here) is still {_fmt(res_s['rmsve_at_5000'])}. It does converge, "
        f"slowly: the expected residual-gradient loss (1/14) sum_s (gamma v(7) - v(s))^2 has Hessian "
        f"eigenvalues {lam_min:.3g} (the direction that moves v(7) to 0 with v(s) = gamma v(7), "
        f"curvature of order (1 - gamma)^2) up to {lam_max:.3g}, so at alpha 0.01 that error decays "
        f"with a time constant of about {1 / (0.01 * lam_min):.2g} steps. ||w|| itself cannot drop below "
        f"{null:.4g}: with 8 weights and 7 states, w0's component along the null space of the features "
        "moves no value and gets no gradient.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs", help="where the runs go (default: runs/, git-ignored)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--results", default="results/baird")
    args = p.parse_args(argv)
    root = run(args.out, args.seeds)
    figure(root, os.path.join(args.results, "figure_11_2.png"))
    rows = numbers(root)
    readme(rows, args.seeds, os.path.join(args.results, "README.md"))
    for r in rows:
        print(r["variant"], {t: r[t][0] for t in CHECKPOINTS}, r["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
