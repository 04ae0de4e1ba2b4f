"""The batch over devices (jax.sharding) and over processes (jax.distributed): same metrics."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rlstop.cli import main
from tests.conftest import TINY_DQN

ARGS = ["train", "configs/dqn_cartpole.yaml", *TINY_DQN, "train.seeds=3"]  # 3 seeds: padded to the device count


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_device")
    assert main([*ARGS, "--out", str(out), "--quiet"]) == 0
    return pd.read_csv(out / "dqn_cartpole" / "metrics.csv")


def assert_same_metrics(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    # Per-device batches sum in a different order: equal up to float32 rounding.
    np.testing.assert_allclose(a.to_numpy(np.float64), b.to_numpy(np.float64), rtol=1e-4, atol=1e-6)


def test_sharded_over_four_devices_gives_the_same_metrics(reference, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-m", "rlstop", *ARGS, "--out", str(tmp_path), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert_same_metrics(reference, pd.read_csv(tmp_path / "dqn_cartpole" / "metrics.csv"))
    # 3 runs on 4 devices: one device per run, the fourth idle
    assert json.loads((tmp_path / "dqn_cartpole" / "summary.json").read_text())["devices"] == 3


def test_two_processes_on_loopback_give_the_same_metrics(reference, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "rlstop", *ARGS, "--out", str(tmp_path), "--quiet"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    # Process 0 wrote the results; process 1 wrote nothing of its own.
    assert_same_metrics(reference, pd.read_csv(tmp_path / "dqn_cartpole" / "metrics.csv"))


def test_one_cpu_device_per_core_and_a_single_run_stays_on_one():
    import jax

    from rlstop.train import parallel, runtime

    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        assert len(jax.devices()) == runtime.cpu_devices()
    assert parallel.batch_mesh(1) is None
    n = len(jax.devices())
    if n > 1:
        assert parallel.batch_mesh(2).devices.size == 2
        assert parallel.batch_mesh(n + 3).devices.size == n


def test_a_bad_cpu_device_count_is_one_error_line(tmp_path):
    env = dict(os.environ, RLSTOP_CPU_DEVICES="two")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "rlstop", *ARGS, "--out", str(tmp_path), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: RLSTOP_CPU_DEVICES='two' must be a positive integer "
                                   "(the number of CPU devices; 1 runs everything on one)")
    assert not any(tmp_path.iterdir())


def test_fast_compile_uses_the_older_cpu_emitters_and_gives_the_same_metrics(reference, tmp_path, monkeypatch):
    from rlstop.train import runtime

    o2 = {"xla_backend_optimization_level": 2}
    monkeypatch.delenv("RLSTOP_FAST_COMPILE", raising=False)
    assert runtime.compiler_options("cpu") == o2
    assert runtime.compiler_options("cpu", always_fast=True) == {**o2, "xla_cpu_use_fusion_emitters": False}
    monkeypatch.setenv("RLSTOP_FAST_COMPILE", "1")
    assert runtime.compiler_options("cpu") == {**o2, "xla_cpu_use_fusion_emitters": False}
    assert runtime.compiler_options("gpu") is None
    assert main([*ARGS, "--out", str(tmp_path), "--quiet"]) == 0
    assert_same_metrics(reference, pd.read_csv(tmp_path / "dqn_cartpole" / "metrics.csv"))
    monkeypatch.setenv("RLSTOP_FAST_COMPILE", "off")
    assert runtime.compiler_options("cpu") == o2


def test_backend_options_go_to_xla_flags_unless_the_user_gave_their_own(monkeypatch):
    from rlstop.train import runtime

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    runtime._set_backend_options()
    ours = "--xla_backend_extra_options=xla_cpu_disable_tiled_emitter=true,xla_cpu_disable_loop_unrolling=true"
    assert os.environ["XLA_FLAGS"] == ours
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    runtime._set_backend_options()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", ours]
    own = "--xla_backend_extra_options=xla_cpu_disable_tiled_emitter=false"
    monkeypatch.setenv("XLA_FLAGS", own)
    runtime._set_backend_options()
    assert os.environ["XLA_FLAGS"] == own
