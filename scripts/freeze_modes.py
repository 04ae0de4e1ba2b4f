"""results/freeze_modes: freezing DQN's torso through the optimizer (mask) or in the loss
(stop_gradient), under AdamW with decoupled weight decay.

Run from the repository root:  python scripts/freeze_modes.py  (under a minute on 2 CPU cores)

1. pretrain:  rlstop train configs/dqn_cartpole.yaml train.total_steps=100000 train.seeds=4 name=pretrain
2. fine-tune: rlstop sweep configs/sweeps/dqn_cartpole_freeze_modes.yaml (init_from the pretrained run,
              agent.freeze=[torso], agent.optimizer=adamw, agent.weight_decay=0.01, freeze_mode mask and
              stop_gradient, 50k env steps, 4 seeds)
3. figures:   rlstop compare ... --metric frozen_param_drift (and eval_return)
4. the drift decoupled weight decay predicts for stop_gradient: with a zero gradient AdamW's step
   is -lr * wd * w, so after N updates the torso is (1 - lr wd)^N w0 and
       frozen_param_drift = ||w0|| (1 - (1 - lr wd)^N),
   w0 = the pretrained run's final torso (per seed), N = updates so far. Measured against
   predicted at every logging point -> drift.csv, drift.md and drift_vs_prediction.png. Also
   against the same recurrence run in float32 (w <- w + (-lr) * (wd * w), optax's order of
   operations), which the closed form only approximates: each step moves a weight by about 40
   float32 ulps, so its rounding shows in the 4th digit of the drift after thousands of steps.

Runs go to runs/freeze_modes/ (git-ignored); figures and tables to results/freeze_modes/.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd

RUNS = "runs/freeze_modes"
OUT = "results/freeze_modes"
SWEEP = "configs/sweeps/dqn_cartpole_freeze_modes.yaml"
SWEEP_DIR = os.path.join(RUNS, "dqn_cartpole_freeze_modes")
MODES = ("mask", "stop_gradient")


def rlstop(*args: str) -> None:
    cmd = ["rlstop", *args]
    print("$ " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    subprocess.run([sys.executable, "-m", "rlstop", *args], check=True)


def predicted(run_dir: str, pretrain: str) -> pd.DataFrame:
    """Measured and predicted frozen_param_drift per (seed, logging point) of one fine-tuning run."""
    import jax

    from rlstop import config as config_lib
    from rlstop import evaluate
    from rlstop import results

    runner = evaluate.load(pretrain)[3]
    torso = runner.agent.params["params"]["torso"]
    flat0 = np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(torso)], axis=1)
    w0 = np.sqrt(np.sum(np.square(flat0.astype(np.float64)), axis=1))  # [pretrain seeds]
    _, df = results.load_run(run_dir)

    ft = config_lib.build_config(config_lib._read_yaml(os.path.join(run_dir, "config.yaml")))
    a = ft.agent
    lr_wd = a.learning_rate * a.weight_decay
    # The scan loop updates once per train_every * num_envs env steps, from learning_starts on.
    per_iter = a.train_every * ft.env.num_envs
    df = df[["seed", "env_steps", "frozen_param_drift"]].copy()
    updates = np.maximum(0, df["env_steps"].to_numpy() // per_iter - (a.learning_starts + per_iter - 1) // per_iter)
    index = (df["seed"].to_numpy() - ft.train.seed) % len(w0)  # seed i starts from pretrain seed i mod n
    df["updates"] = updates
    df["w0_norm"] = w0[index]
    df["predicted"] = w0[index] * (1.0 - (1.0 - lr_wd) ** updates)
    # The float32 recurrence, per seed, read at each logging point's update count.
    neg_lr, wd = np.float32(-np.float32(a.learning_rate)), np.float32(a.weight_decay)
    w, f32, wanted = flat0.copy(), {}, set(updates.tolist())
    for k in range(int(updates.max()) + 1):
        if k in wanted:
            f32[k] = np.sqrt(np.sum(np.square(w.astype(np.float64) - flat0), axis=1))
        w = (w + neg_lr * (wd * w)).astype(np.float32)
    df["float32_recurrence"] = [f32[u][i] for u, i in zip(updates, index)]
    return df


def figure(tables: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, (mode, df) in enumerate(tables.items()):
        for j, (seed, g) in enumerate(df.groupby("seed")):
            ax.plot(g["env_steps"], g["frozen_param_drift"], "o", ms=4, color=f"C{i}",
                    label=f"{mode}: measured (each seed)" if j == 0 else None)
            if mode == "stop_gradient":
                ax.plot(g["env_steps"], g["predicted"], "-", lw=1, color="k",
                        label="||w0|| (1 - (1 - lr wd)^N): decoupled weight decay alone" if j == 0 else None)
    ax.set_xlabel("fine-tuning env steps")
    ax.set_ylabel("frozen_param_drift = ||torso - torso at start||")
    ax.set_title("DQN CartPole, torso frozen, AdamW (lr 2.5e-4, weight decay 0.01)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    rlstop("train", "configs/dqn_cartpole.yaml", "train.total_steps=100000", "train.seeds=4", "name=pretrain",
           "--out", RUNS, "--quiet")
    rlstop("sweep", SWEEP, "--out", RUNS, "--quiet")
    rlstop("compare", SWEEP_DIR, "--metric", "frozen_param_drift", "--out", os.path.join(OUT, "frozen_param_drift.png"))
    rlstop("compare", SWEEP_DIR, "--metric", "eval_return", "--out", os.path.join(OUT, "eval_return.png"))

    tables = {m: predicted(os.path.join(SWEEP_DIR, f"freeze_mode={m}"), os.path.join(RUNS, "pretrain")) for m in MODES}
    tables["mask"][["predicted", "float32_recurrence"]] = np.nan  # the prediction is stop_gradient's
    figure(tables, os.path.join(OUT, "drift_vs_prediction.png"))
    both = pd.concat([df.assign(freeze_mode=m) for m, df in tables.items()], ignore_index=True)
    both.to_csv(os.path.join(OUT, "drift.csv"), index=False, float_format="%.9g")

    sg = tables["stop_gradient"]
    moved = sg["updates"] > 0
    rel = lambda col: (np.abs(sg["frozen_param_drift"] - sg[col]) / sg[col])[moved].max()  # noqa: E731
    last = sg[sg["env_steps"] == sg["env_steps"].max()]
    lines = ["| freeze_mode | seed | updates N | ||w0|| | measured drift | ||w0|| (1 - (1 - lr wd)^N) "
             "| float32 recurrence |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, df in tables.items():
        end = df[df["env_steps"] == df["env_steps"].max()]
        for r in end.itertuples():
            pred = (f"{r.predicted:.6g} | {r.float32_recurrence:.6g}" if m == "stop_gradient"
                    else "- | - (the optimizer gives the torso a zero update)")
            lines.append(f"| {m} | {r.seed} | {r.updates} | {r.w0_norm:.6g} | {r.frozen_param_drift:.6g} | {pred} |")
    mask = tables["mask"]["frozen_param_drift"]
    lines += ["", f"- mask: largest frozen_param_drift over every seed and logging point = {mask.abs().max():.6g}",
              f"- stop_gradient: largest |measured - closed form| / closed form over every seed and logging point "
              f"with N > 0 = {rel('predicted'):.3g}",
              f"- stop_gradient: largest |measured - float32 recurrence| / float32 recurrence = "
              f"{rel('float32_recurrence'):.3g}",
              f"- stop_gradient: mean drift at {int(last['env_steps'].iloc[0]):,} steps = "
              f"{last['frozen_param_drift'].mean():.6g} (closed form {last['predicted'].mean():.6g}), "
              f"{last['frozen_param_drift'].mean() / last['w0_norm'].mean():.4%} of ||w0||"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "drift.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
