#!/usr/bin/env python3
"""Benchmark: rlstop against rejax 0.1.3 at matched settings, measured in the same run.

For each (algorithm, seeds) it runs, each in its own process (so peak memory is its own):
  * rlstop: the fully-jitted scan loop (`rlstop.train.driver.run_group`), all seeds vmapped;
  * the peer: rejax 0.1.3 through scripts/peers/rejax_peer.py, in the rejax virtual environment
    given by --peer-python (rejax needs gymnax<1; see scripts/peers/rejax-requirements.txt).
It prints compile time (cold, and again from the persistent compilation cache), run time
(compile excluded), env steps/s, peak memory (max RSS) and the ratios rlstop / peer.

rlstop's compile time is the time until training starts: the init and chunk functions. Its
greedy evaluation compiles in a second thread while the first chunk runs (``rlstop.train.driver``);
that compile's own time is in the JSON as ``eval_compile_s``, and any slowdown it causes is in
the run time.

    python scripts/bench.py --peer-python /work/rejax-venv/bin/python
    python scripts/bench.py --algos dqn --seeds 1 16
    python scripts/bench.py --scale              # env steps/s as the batch grows: 1 16 256 1024 seeds
    python scripts/bench.py --algos ppo --seeds 1 --repeat 5   # five interleaved pairs

Run-to-run noise. On a shared 2-core machine one run's time can move by 10-20% from one run to
the next, more than many of the differences worth measuring. ``--repeat N`` runs N pairs, each
rlstop's run followed at once by the peer's, so both sides see the same phase of the machine;
it prints every pair and, per (algorithm, seeds), the median and range of the pairs' ratios.

Settings. DQN: CleanRL's CartPole DQN (500k steps, 1 env, update every 10 steps, batch 128,
buffer 10k, learning starts 10k, hard target sync every 500 steps, Adam 2.5e-4, epsilon 1 ->
0.05 over half the run) with a 64-64 MLP (rejax's fixed size). PPO: rejax's CartPole PPO
(64 envs x 64 steps, 8 epochs, 16 minibatches, lr 3e-4, gamma 0.99, lambda 0.95, clip 0.2,
vf 0.5, entropy 0.01, 64-64 tanh MLPs); 499,712 steps (122 rollouts of 4096) on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {
    "dqn": ("configs/dqn_cartpole.yaml", ["agent.hidden_sizes=[64,64]", "train.log_every=50000",
                                          "train.eval_every=500000"]),
    "ppo": ("configs/ppo_cartpole.yaml", ["train.total_steps=499712", "train.log_every=8192",
                                          "train.eval_every=499712"]),
}


# --scale: env steps/s as the batch grows. The work per seed shrinks as seeds grow (about 1M
# env steps in all, at least 2 logging points) so that 1024 seeds fit in minutes on 2 cores;
# env steps/s is the figure, not the return.
def _scale(total: int, log_every: int, extra: list[str]) -> list[str]:
    return [f"train.total_steps={total}", f"train.log_every={log_every}", f"train.eval_every={total}",
            "train.eval_episodes=1", *extra]


SCALE_SETS = {
    "dqn": lambda n: _scale(max(4000, 1_024_000 // n // 2000 * 2000), 2000, ["agent.learning_starts=1000"]),
    "ppo": lambda n: _scale(max(8192, 1_048_576 // n // 4096 * 4096), 4096, []),
}


def child(algo: str, seeds: int, extra: list[str], compile_only: bool = False) -> dict:
    """Measure rlstop in this process and return one JSON-able dict."""
    from rlstop import config as config_lib
    from rlstop.train import driver

    path, overrides = CONFIGS[algo]
    cfg = config_lib.load_config(os.path.join(ROOT, path), overrides + [f"train.seeds={seeds}"] + extra)
    res = driver.run_group([cfg], compile_only=compile_only)
    if compile_only:
        return {"compile_s": res.compile_s, "cache_hits": res.compile_cache_hits, "eval_compile_s": res.eval_compile_s}
    df = res.metrics[0]
    last = df[df.env_steps == df.env_steps.max()]
    return {
        "who": "rlstop", "algo": algo, "seeds": seeds, "total_steps": cfg.train.total_steps,
        "compile_s": res.compile_s, "eval_compile_s": res.eval_compile_s, "run_s": res.wall_s - res.compile_s,
        "env_steps_per_s": res.env_steps_per_s,
        "final_eval_return_mean": float(last["eval_return"].mean()) if "eval_return" in last else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_rlstop(algo: str, seeds: int, extra: list[str]) -> dict:
    """The measured run, with an empty compilation cache (a first run: compile from scratch, and
    fill the cache); then a second process that compiles the same program again and finds it
    in the cache (what every later run of the config pays): ``compile_cached_s``."""
    with tempfile.TemporaryDirectory(prefix="rlstop-bench-cache-") as cache:
        env = {**os.environ, "RLSTOP_COMPILATION_CACHE": cache}
        out = {}
        for mode in ("run", "compile"):
            cmd = [sys.executable, __file__, "--child", algo, str(seeds)] + [f"--set={e}" for e in extra]
            cmd += ["--compile-only"] if mode == "compile" else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"rlstop {algo} x{seeds} failed:\n{proc.stderr[-3000:]}")
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    d = out["run"]
    d["compile_cached_s"] = out["compile"]["compile_s"] if out["compile"]["cache_hits"] else None
    return d


def run_peer(python: str, algo: str, seeds: int) -> dict | None:
    total = "499712" if algo == "ppo" else "500000"
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", python, os.path.join(HERE, "peers", "rejax_peer.py"),
           "--algo", algo, "--seeds", str(seeds), "--total-steps", total]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(f"peer {algo} x{seeds} failed: {out.stderr[-2000:]}", file=sys.stderr)
        return None
    d = json.loads(out.stdout.strip().splitlines()[-1])
    d.pop("unmatched", None)
    rss = [ln for ln in out.stderr.splitlines() if ln.startswith("MAXRSS_KB")]
    d["peak_rss_mb"] = int(rss[-1].split()[1]) / 1024 if rss else None
    d["who"] = "rejax"
    return d


def fmt_row(d: dict) -> str:
    ret = d.get("final_eval_return_mean")
    mem = d.get("peak_rss_mb")
    cached = d.get("compile_cached_s")
    return (f"| {d['who']} | {d['algo']} | {d['seeds']} | {d['compile_s']:.2f} | "
            f"{'-' if cached is None else f'{cached:.2f}'} | {d['run_s']:.2f} | {d['env_steps_per_s']:,.0f} | "
            f"{'?' if mem is None else f'{mem:,.0f}'} | {ret if ret is None else round(ret, 1)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algos", nargs="+", default=["dqn", "ppo"], choices=sorted(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 16])
    p.add_argument("--peer-python", default=os.environ.get("REJAX_PYTHON", "/work/rejax-venv/bin/python"),
                   help="python of a venv with scripts/peers/rejax-requirements.txt installed ('' to skip)")
    p.add_argument("--scale", action="store_true",
                   help="rlstop only, seeds 1 16 256 1024, shorter runs (about 1M env steps each)")
    p.add_argument("--repeat", type=int, default=1,
                   help="interleaved rlstop/peer pairs per (algo, seeds) (default 1); the summary gives the "
                        "median and range of the pairs' ratios")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: must be at least 1 (the number of rlstop/peer pairs)")

    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.set, args.compile_only)))
        return

    seeds_list = [1, 16, 256, 1024] if args.scale else args.seeds
    have_peer = bool(args.peer_python) and os.path.exists(args.peer_python) and not args.scale
    if not have_peer and not args.scale:
        print(f"note: no peer python at {args.peer_python!r}; measuring rlstop only", file=sys.stderr)
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min load average; 2 cores)")
    rows, ratios = [], []
    for algo in args.algos:
        for seeds in seeds_list:
            for rep in range(args.repeat):
                t = time.time()
                ours = run_rlstop(algo, seeds, SCALE_SETS[algo](seeds) if args.scale else [])
                ours["pair"] = rep
                rows.append(ours)
                print(fmt_row(ours), f"  [{time.time() - t:.0f}s]", flush=True)
                if have_peer:
                    peer = run_peer(args.peer_python, algo, seeds)
                    if peer:
                        peer["pair"] = rep
                        rows.append(peer)
                        print(fmt_row(peer), flush=True)
                        ratios.append((algo, seeds, ours["run_s"] / peer["run_s"],
                                       ours["compile_s"] / peer["compile_s"],
                                       (ours["peak_rss_mb"] or 0) / (peer["peak_rss_mb"] or 1)))
    print("\n| who | algo | seeds | compile s | compile s, cached | run s | env steps/s | peak RSS MB "
          "| final eval return |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(fmt_row(r))
    if ratios:
        print("\n| algo | seeds | run time rlstop/rejax | compile rlstop/rejax | peak memory rlstop/rejax |")
        print("|---|---:|---:|---:|---:|")
        for algo, seeds, rr, cr, mr in ratios:
            print(f"| {algo} | {seeds} | {rr:.2f} | {cr:.2f} | {mr:.2f} |")
        if args.repeat > 1:
            print("\n| algo | seeds | pairs | run time rlstop/rejax: median [min, max] | compile: median |")
            print("|---|---:|---:|---:|---:|")
            for key in dict.fromkeys((a, n) for a, n, *_ in ratios):
                rr = [r[2] for r in ratios if r[:2] == key]
                cr = [r[3] for r in ratios if r[:2] == key]
                print(f"| {key[0]} | {key[1]} | {len(rr)} | {statistics.median(rr):.2f} [{min(rr):.2f}, {max(rr):.2f}] "
                      f"| {statistics.median(cr):.2f} |")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
