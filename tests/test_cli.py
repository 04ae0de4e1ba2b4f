"""The command line: bad input gives one `error:` line and exit 2 with nothing written; runs and
sweeps write the documented layout and resume."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from rlstop.cli import main
from tests.conftest import TINY_DQN


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, expect", [
    (["agent.learning_rte=1e-3"], "agent.learning_rate"),
    (["train.seeds=many"], "train.seeds"),
    (["train.seeds=0"], "train.seeds"),
    (["agent.gamma=1.5"], "agent.gamma"),
    (["agent.kind=dqnn"], "'dqn'"),
    (["agent.hidden_sizes=big"], "agent.hidden_sizes"),
    (["env.backend=jax"], "env.backend"),
    (["nonsense"], "key=value"),
    (["trian.seeds=2"], "section"),
    (["env.id=Pendulum-v1"], "discrete action space"),
    (["env.id=NoSuchEnv-v0", "env.backend=gymnasium"], "unknown env id"),
])
def test_bad_overrides_give_one_error_line_and_write_nothing(tmp_path, capsys, args, expect):
    out_dir = tmp_path / "runs"
    code, out, err = run_cli(["train", "configs/dqn_cartpole.yaml", *args, "--out", str(out_dir)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0]
    assert not out_dir.exists()


def test_missing_and_malformed_config_files(tmp_path, capsys):
    code, _, err = run_cli(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: [unclosed\n")
    code, _, err = run_cli(["train", str(bad)], capsys)
    assert code == 2 and "YAML" in err
    code, _, err = run_cli(["compare", str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.startswith("error: ")


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlstop", "train", "configs/dqn_cartpole.yaml",
                           "agent.learning_rte=1e-3", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown config key 'agent.learning_rte'; "
                                   "did you mean agent.learning_rate?")
    assert not (tmp_path / "r").exists()


def test_persistent_compilation_cache_gives_the_same_run(tmp_path):
    """A second process running the same config loads its executables from the cache folder
    (summary.json counts them) and writes exactly the same metrics."""
    env = {**os.environ, "RLSTOP_COMPILATION_CACHE": str(tmp_path / "cache")}
    summaries, metrics = [], []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "rlstop", "train", "configs/dqn_cartpole.yaml", *TINY_DQN,
                               f"name={name}", "--out", str(tmp_path / "runs"), "--quiet"],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        run = tmp_path / "runs" / name
        summaries.append(json.load(open(run / "summary.json")))
        metrics.append((run / "metrics.csv").read_text())
    assert summaries[0]["compile_cache_hits"] == 0
    assert summaries[1]["compile_cache_hits"] >= 2  # init and the training chunk
    assert metrics[0] == metrics[1]
    assert os.listdir(tmp_path / "cache")


def test_list(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    assert "stop_gradient_target=true" in out and "CartPole-v1" in out and "baird" in out


def test_train_writes_the_run_folder_and_resumes(tmp_path, capsys):
    out_dir = str(tmp_path / "runs")
    args = ["train", "configs/dqn_cartpole.yaml", *TINY_DQN, "train.seeds=2", "--out", out_dir, "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run = os.path.join(out_dir, "dqn_cartpole")
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "metrics.csv", "summary.json"]
    df = pd.read_csv(os.path.join(run, "metrics.csv"))
    assert list(df.columns[:4]) == ["seed", "env_steps", "episode_return", "eval_return"]
    assert {"q_mean", "q_max_abs", "loss", "grad_norm", "diverged"} <= set(df.columns)
    assert sorted(df.seed.unique()) == [0, 1] and sorted(df.env_steps.unique()) == [1000, 2000]
    s = json.load(open(os.path.join(run, "summary.json")))
    assert s["status"] in ("completed", "diverged") and s["seeds"] == [0, 1]
    for k in ("wall_s", "compile_s", "env_steps_per_s", "versions"):
        assert k in s
    assert len(s["final"]["eval_return"]["per_seed"]) == 2
    assert "jax" in s["versions"]
    # The same command again: nothing to do.
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "already finished" in out
    # A different config into the same folder is refused, and the finished run is untouched.
    before = open(os.path.join(run, "metrics.csv")).read()
    code, _, err = run_cli(args + ["agent.double_q=true"], capsys)
    assert code == 2 and "different config" in err
    assert open(os.path.join(run, "metrics.csv")).read() == before
    # TensorBoard event files on request, one folder per seed.
    code, _, err = run_cli(args + ["train.tensorboard=true", "name=tb"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(os.path.join(out_dir, "tb", "tensorboard"))) == ["seed0", "seed1"]
    assert os.listdir(os.path.join(out_dir, "tb", "tensorboard", "seed0"))[0].startswith("events.out.tfevents")


def test_sweep_groups_into_one_compile_and_compare_writes_figures(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "base: configs/dqn_cartpole.yaml\nname: tiny\ngrid:\n"
        "  agent.stop_gradient_target: [true, false]\n  agent.target_network: [true, false]\n"
        "set:\n" + "".join(f"  {o.split('=')[0]}: {o.split('=')[1]}\n" for o in TINY_DQN) + "  train.seeds: 2\n")
    out_dir = tmp_path / "runs"
    code, out, err = run_cli(["sweep", str(sweep), "--out", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    state = json.load(open(out_dir / "tiny" / "sweep.json"))
    assert len(state["runs"]) == 4 and len(state["groups"]) == 1
    assert state["groups"][0]["compiles"] == 1 and state["groups"][0]["batch"] == 8
    assert all(r["status"] in ("completed", "diverged") for r in state["runs"].values())
    code, out, err = run_cli(["compare", str(out_dir / "tiny"), "--metric", "q_max_abs"], capsys)
    assert code == 0, err
    assert (out_dir / "tiny" / "compare" / "q_max_abs.png").stat().st_size > 10_000
    table = pd.read_csv(out_dir / "tiny" / "compare" / "table.csv")
    assert len(table) == 4 and {"final_iqm", "ci_low", "ci_high", "auc", "diverged_fraction"} <= set(table.columns)
    code, _, err = run_cli(["compare", str(out_dir / "tiny"), "--metric", "q_maxabs"], capsys)
    assert code == 2 and "q_max_abs" in err
