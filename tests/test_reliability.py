"""Reliability: determinism, resume after SIGKILL (single run and sweep), divergence isolated to
the seeds that diverge, and the config loader never raising anything but UserError."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlstop import config as config_lib
from rlstop.cli import main
from rlstop.errors import UserError
from tests.conftest import TINY_DQN

# Long enough to be killed in the middle, with a checkpoint every 4000 env steps.
LONG = [o for o in TINY_DQN if not o.startswith("train.total_steps")] + [
    "train.total_steps=16000", "train.checkpoint_every=2000"]


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "rlstop", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"finished before {path} appeared: {proc.communicate()}"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run, the reference for determinism and resume."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["train", "configs/dqn_cartpole.yaml", *LONG, "train.seeds=2", "--out", str(out), "--quiet"]) == 0
    return out / "dqn_cartpole"


def test_same_config_and_seed_give_byte_identical_metrics(uninterrupted, tmp_path):
    assert main(["train", "configs/dqn_cartpole.yaml", *LONG, "train.seeds=2", "--out", str(tmp_path), "--quiet"]) == 0
    a = (uninterrupted / "metrics.csv").read_bytes()
    assert a == (tmp_path / "dqn_cartpole" / "metrics.csv").read_bytes()
    # and a different first seed gives different curves
    assert main(["train", "configs/dqn_cartpole.yaml", *LONG, "train.seeds=2", "train.seed=5", "name=other",
                 "--out", str(tmp_path), "--quiet"]) == 0
    assert a != (tmp_path / "other" / "metrics.csv").read_bytes()


def test_killed_run_resumes_from_its_checkpoint_and_matches(uninterrupted, tmp_path):
    args = ["train", "configs/dqn_cartpole.yaml", *LONG, "train.seeds=2", "--out", str(tmp_path), "--quiet"]
    proc = cli(*args)
    wait_for(tmp_path / "dqn_cartpole" / "checkpoints" / "latest" / "resume.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "dqn_cartpole"
    assert not (run / "summary.json").exists() and not (run / "metrics.csv").exists()
    assert not [p for p in os.listdir(run) if p.startswith(".tmp")]
    proc = cli(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed" in out
    assert (run / "metrics.csv").read_bytes() == (uninterrupted / "metrics.csv").read_bytes()
    assert not (run / "checkpoints" / "latest").exists()


def test_killed_sweep_redoes_nothing_finished(tmp_path):
    """Two static groups (hidden sizes): kill -9 after the first finished, rerun, compare with an
    uninterrupted sweep."""
    sweep = tmp_path / "s.yaml"
    sets = [o for o in LONG if not o.startswith("agent.hidden_sizes")]
    sweep.write_text(yaml.safe_dump({
        "base": os.path.abspath("configs/dqn_cartpole.yaml"), "name": "killme",
        "grid": {"agent.hidden_sizes": [[8], [6]], "agent.target_network": [True, False]},
        "set": {o.split("=")[0]: yaml.safe_load(o.split("=")[1]) for o in sets},
    }))
    ref = tmp_path / "ref"
    assert main(["sweep", str(sweep), "--out", str(ref), "--quiet"]) == 0
    out = tmp_path / "out"
    proc = cli("sweep", str(sweep), "--out", str(out), "--quiet")
    first = out / "killme" / "hidden_sizes=8,target_network=true" / "summary.json"
    second_group = out / "killme" / ".checkpoints" / "group-hidden_sizes=6,target_network=false-hidden_sizes=6,target_network=true"
    wait_for(second_group / "resume.json", proc, timeout=300)  # the second group is under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.load(open(out / "killme" / "sweep.json"))
    done_before = {k for k, v in state["runs"].items() if v["status"] != "pending"}
    assert done_before == {"hidden_sizes=8,target_network=true", "hidden_sizes=8,target_network=false"}
    mtime = first.stat().st_mtime_ns
    proc = cli("sweep", str(sweep), "--out", str(out), "--quiet")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert first.stat().st_mtime_ns == mtime  # not recomputed
    state = json.load(open(out / "killme" / "sweep.json"))
    assert all(v["status"] in ("completed", "diverged") for v in state["runs"].values())
    for name in state["runs"]:
        assert (out / "killme" / name / "metrics.csv").read_bytes() == (ref / "killme" / name / "metrics.csv").read_bytes()


def test_a_diverging_run_is_recorded_and_its_batch_mates_carry_on(tmp_path, capsys):
    """Baird with a huge step size overflows to non-finite values; batched with the book's step
    size, only its own seeds are marked, and tables mark it instead of printing NaN."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": os.path.abspath("configs/baird.yaml"), "name": "blowup",
        "grid": {"agent.learning_rate": [0.01, 50.0]},
        "set": {"train.total_steps": 3000, "train.log_every": 100, "train.seeds": 2,
                "agent.stop_gradient_target": False},
    }))
    assert main(["sweep", str(sweep), "--out", str(tmp_path), "--quiet"]) == 0
    ok = json.load(open(tmp_path / "blowup" / "learning_rate=0.01" / "summary.json"))
    bad = json.load(open(tmp_path / "blowup" / "learning_rate=50.0" / "summary.json"))
    assert ok["status"] == "completed" and ok["diverged"]["fraction"] == 0
    assert bad["status"] == "diverged" and all(bad["diverged"]["nonfinite"])
    assert all(s is not None for s in bad["diverged"]["step"])
    df = pd.read_csv(tmp_path / "blowup" / "learning_rate=0.01" / "metrics.csv")
    assert np.isfinite(df["w_norm"]).all()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "blowup")]) == 0
    md = (tmp_path / "blowup" / "compare" / "table.md").read_text()
    assert "nan" not in md.lower().replace("n/a", "")
    assert "100%" in md


# --- the config loader never raises anything but UserError ------------------------------------

VALID_KEYS = [f"agent.{k}" for k in config_lib.agent_config_class("dqn").__dataclass_fields__] + \
             [f"env.{k}" for k in config_lib.EnvConfig.__dataclass_fields__] + \
             [f"train.{k}" for k in config_lib.TrainConfig.__dataclass_fields__] + ["name"]
values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=4),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
keys = st.one_of(st.sampled_from(VALID_KEYS), st.text(min_size=1, max_size=20),
                 st.sampled_from(VALID_KEYS).map(lambda k: k + "x"))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=4))
def test_any_override_ends_in_a_valid_config_or_one_user_error(overrides):
    base = config_lib._read_yaml("configs/dqn_cartpole.yaml")
    try:
        data = config_lib._deep_merge(base, config_lib.parse_overrides(
            [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in overrides.items()]))
        cfg = config_lib.build_config(data)
        assert isinstance(cfg, config_lib.RunConfig)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_any_yaml_text_ends_in_a_valid_config_or_one_user_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text)
    try:
        config_lib.load_config(str(path))
    except UserError as e:
        assert "\n" not in str(e)
