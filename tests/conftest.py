import os

import pytest

from rlstop.train import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests compile afresh and leave nothing in the user's cache folder (this process and the CLI
# subprocesses it starts); test_cli checks the persistent compilation cache on its own folder.
os.environ["RLSTOP_COMPILATION_CACHE"] = "off"

# The process-wide settings the CLI applies before JAX starts (one CPU device per core among
# them), so that in-process tests run as `rlstop` does whichever test happens to start JAX.
runtime.configure()


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Tests refer to configs/ relative to the repository root, as users do."""
    monkeypatch.chdir(ROOT)


# Tiny DQN on CartPole: compiles in seconds, runs in a fraction of one.
TINY_DQN = [
    "agent.hidden_sizes=[8]", "agent.batch_size=16", "agent.buffer_size=1000", "agent.learning_starts=200",
    "train.total_steps=2000", "train.log_every=1000", "train.eval_episodes=2",
]
