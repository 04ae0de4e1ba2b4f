"""Frozen sub-trees, detached features, the optimizers, and initialisation from another run.

mask freezes (the parameters never move, for every optimizer); stop_gradient detaches (their
gradient is exactly zero, yet AdamW's decoupled weight decay still shrinks them by (1 - lr wd) a
step); init_from restores parameters exactly; bad names and shapes are one-line errors.
"""
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from rlstop import config as config_lib
from rlstop.agents import freeze
from rlstop.agents.actor_critic import hparams as ac_hparams
from rlstop.agents.dqn import DQN, DQNConfig, hparams
from rlstop.agents.replay import Transition
from rlstop.cli import main
from rlstop.errors import UserError
from tests.conftest import TINY_DQN
from tests.test_actor_critic import Fixture, norm, part

OBS, ACTIONS, B, N = 3, 2, 8, 10
LR, WD = 1e-2, 0.5  # (1 - lr wd) = 0.995 a step: a drift well above float32 rounding
OPTIMIZERS = {"adam": {}, "adamw": {"weight_decay": WD}, "sgd": {"momentum": 0.9}}


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# DQN: N updates of a tiny Q-network with the torso frozen, one compile per (optimizer, mode).

@functools.lru_cache(maxsize=None)
def dqn_run(optimizer: str, mode: str, frozen: tuple = ("torso",)):
    """(initial state, state after N updates, gradient of the first update's loss)."""
    cfg = DQNConfig(hidden_sizes=[8], gamma=0.9, learning_rate=LR, optimizer=optimizer, freeze=list(frozen),
                    freeze_mode=mode, **OPTIMIZERS[optimizer])
    agent = DQN(cfg, (OBS,), ACTIONS)
    hp = hparams(cfg)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    batch = Transition(jax.random.normal(k2, (B, OBS)), jnp.arange(B) % ACTIONS, jnp.linspace(-1.0, 1.0, B),
                       jnp.zeros(B, bool).at[3].set(True), jax.random.normal(k3, (B, OBS)))
    state0 = jax.jit(agent.init)(k1, hp)
    update = jax.jit(lambda s: agent.update(s, batch, hp, jnp.asarray(False))[0])
    state = state0
    for _ in range(N):
        state = update(state)
    grads = jax.jit(lambda p: agent.gradients(p, state0.target_params, batch, hp)[1])(state0.params)
    return state0, state, grads


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_mask_keeps_frozen_parameters_bit_identical_for_every_optimizer(optimizer):
    s0, s, _ = dqn_run(optimizer, "mask")
    assert leaves_equal(s.params["params"]["torso"], s0.params["params"]["torso"])
    assert not leaves_equal(s.params["params"]["head"], s0.params["params"]["head"])  # the rest trains


def test_stop_gradient_gives_frozen_parameters_exactly_zero_gradient():
    _, _, g = dqn_run("adamw", "stop_gradient")
    assert norm(g["params"]["torso"]) == 0.0
    assert norm(g["params"]["head"]) > 0.0
    _, _, g_off = dqn_run("adamw", "stop_gradient", frozen=())  # nothing frozen: the torso has a gradient
    assert norm(g_off["params"]["torso"]) > 0.0


def test_stop_gradient_under_adamw_decays_by_exactly_what_decoupled_weight_decay_predicts():
    """Zero gradient: Adam's moments stay 0 and its step is 0 / (sqrt(0) + eps) = 0, so each
    AdamW step is w <- w - lr * wd * w; after N steps w = (1 - lr wd)^N w0."""
    s0, s, _ = dqn_run("adamw", "stop_gradient")
    factor = (1.0 - LR * WD) ** N  # 0.995^10 = 0.95111...
    np.testing.assert_allclose(factor, 0.9511101304657719, rtol=1e-12)
    for w, w0 in zip(jax.tree.leaves(s.params["params"]["torso"]), jax.tree.leaves(s0.params["params"]["torso"])):
        np.testing.assert_allclose(w, factor * np.asarray(w0, np.float64), rtol=1e-5, atol=1e-7)
    drift = float(freeze.drift(s.params, freeze.select(s0.params, ["torso"]), ["torso"])["frozen_param_drift"])
    w0_norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(s0.params["params"]["torso"]))))
    np.testing.assert_allclose(drift, (1.0 - factor) * w0_norm, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stop_gradient_without_weight_decay_leaves_them_in_place(optimizer):
    # A zero gradient from the first step: Adam's step and SGD's momentum are exactly zero.
    s0, s, _ = dqn_run(optimizer, "stop_gradient")
    assert leaves_equal(s.params["params"]["torso"], s0.params["params"]["torso"])


def test_mask_under_adamw_is_what_stop_gradient_is_not():
    m0, m, _ = dqn_run("adamw", "mask")
    d0, d, _ = dqn_run("adamw", "stop_gradient")
    # The same start; after N steps the masked torso is where it was, the detached one has decayed.
    assert leaves_equal(m0.params, d0.params)
    assert not leaves_equal(m.params["params"]["torso"], d.params["params"]["torso"])


# ---------------------------------------------------------------------------------------------
# Actor-critic: the same two modes on the flat optimizer vectors; detached features.

@pytest.fixture(scope="module")
def ac_mask():
    return Fixture(3, freeze=["critic_torso"], freeze_mode="mask", optimizer="adamw", weight_decay=WD,
                   learning_rate=LR)


@pytest.fixture(scope="module")
def ac_detach():
    return Fixture(4, freeze=["critic_torso"], freeze_mode="stop_gradient", optimizer="adamw", weight_decay=WD,
                   learning_rate=LR)


@pytest.fixture(scope="module")
def ac_shared():
    return Fixture(5, shared_torso=True)


def test_actor_critic_mask_keeps_frozen_parameters_bit_identical(ac_mask):
    f = ac_mask
    hp = ac_hparams(f.cfg)
    s, _ = f.update(f.state, f.rollout, hp)
    s, _ = f.update(s, f.rollout, hp)
    assert leaves_equal(part(s.params, ("critic_torso",)), part(f.state.params, ("critic_torso",)))
    assert norm(jax.tree.map(jnp.subtract, part(s.params, ("value_head", "actor_torso")),
                             part(f.state.params, ("value_head", "actor_torso")))) > 0


def test_actor_critic_stop_gradient_zero_gradient_and_weight_decay(ac_detach):
    f = ac_detach
    for term in ("actor_loss", "critic_loss", "entropy"):
        assert norm(part(f.grad(term), ("critic_torso",))) == 0.0, term
    assert norm(part(f.grad("critic_loss"), ("value_head",))) > 0.0
    s, _ = f.update(f.state, f.rollout, ac_hparams(f.cfg))  # one update = num_epochs (2) gradient steps
    factor = (1.0 - LR * WD) ** f.cfg.num_epochs
    for w, w0 in zip(jax.tree.leaves(part(s.params, ("critic_torso",))),
                     jax.tree.leaves(part(f.state.params, ("critic_torso",)))):
        np.testing.assert_allclose(w, factor * np.asarray(w0, np.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flag", [True, False])
def test_stop_gradient_critic_features_detaches_the_shared_torso_from_the_critic_loss(ac_shared, flag):
    g = ac_shared.grad("critic_loss", stop_gradient_critic_features=flag)
    assert (norm(part(g, ("torso",))) == 0.0) == flag
    assert norm(part(g, ("value_head",))) > 0.0
    # Features, not parameters: the actor's loss still trains the torso either way.
    assert norm(part(ac_shared.grad("actor_loss", stop_gradient_critic_features=flag), ("torso",))) > 0.0


def test_actor_critic_loop_logs_zero_drift_under_mask():
    from rlstop.train import driver

    cfg = config_lib.load_config("configs/a2c_cartpole.yaml", [
        "train.total_steps=800", "train.log_every=400", "train.eval_episodes=1", "agent.hidden_sizes=[8]",
        "agent.freeze=[value_head,critic_torso]", "agent.optimizer=sgd", "agent.momentum=0.9"])
    res = driver.run_group([cfg])
    df = res.metrics[0]
    for k in ("frozen_param_drift", "frozen_param_drift/value_head", "frozen_param_drift/critic_torso"):
        assert (df[k] == 0.0).all(), k
    assert leaves_equal(res.runner.frozen0, freeze.select(res.runner.agent.params, ["value_head", "critic_torso"]))


# ---------------------------------------------------------------------------------------------
# init_from and frozen_param_drift through the CLI.

def cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def final_params(run_dir):
    from rlstop import evaluate

    return jax.tree.map(np.asarray, evaluate.load(run_dir)[3].agent.params)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny DQN run with 2 seeds: (output folder, its folder, its final parameters)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "configs/dqn_cartpole.yaml", *TINY_DQN, "train.seeds=2", "name=src", "--out", str(out),
                 "--quiet"]) == 0
    return out, str(out / "src"), final_params(str(out / "src"))


def test_init_from_restores_saved_parameters_exactly(source):
    from rlstop.train import driver

    _, src, saved = source
    rows = np.array([0, 1, 0])  # seed i takes seed i mod 2
    for names in (None, ["torso"]):
        over = [*TINY_DQN, "train.seeds=3", f"agent.init_from={src}", "agent.init_params=" + ("[torso]" if names else "null")]
        cfg = config_lib.load_config("configs/dqn_cartpole.yaml", over)
        program = driver.make_program(cfg, driver.make_env(cfg.env))
        hp, axes = driver.batch_hparams([cfg])
        fresh = jax.jit(jax.vmap(program.init, in_axes=(0, axes)))(driver.batch_keys([cfg]), hp)
        runner = freeze.prepare(fresh, [cfg])
        p = runner.agent.params["params"]
        for name in names or ("torso", "head"):
            expect = jax.tree.map(lambda x: x[rows], saved["params"][name])
            assert leaves_equal(p[name], expect), name
        if names:  # the head was not loaded: it keeps the new run's own initialisation
            assert leaves_equal(p["head"], fresh.agent.params["params"]["head"])
        assert leaves_equal(runner.agent.target_params, runner.agent.params)


@pytest.mark.parametrize("mode", ["mask", "stop_gradient"])
def test_fine_tuning_with_a_frozen_torso_logs_its_drift(source, capsys, mode):
    out, src, saved = source
    name = f"ft_{mode}"
    code, _, err = cli(["train", "configs/dqn_cartpole.yaml", *TINY_DQN, "train.seeds=2", f"name={name}",
                        f"agent.init_from={src}", "agent.freeze=[torso]", f"agent.freeze_mode={mode}",
                        "agent.optimizer=adamw", "agent.weight_decay=0.1", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    df = pd.read_csv(out / name / "metrics.csv")
    final = final_params(str(out / name))
    torso0 = saved["params"]["torso"]
    if mode == "mask":
        assert (df["frozen_param_drift"] == 0.0).all()
        assert leaves_equal(final["params"]["torso"], torso0)
    else:
        # (2000 - 200) / 10 = 180 AdamW steps with a zero gradient, lr 2.5e-4, wd 0.1.
        factor = (1.0 - 2.5e-4 * 0.1) ** 180
        w0 = np.sqrt(sum(np.sum(np.square(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(torso0)))
        last = df[df["env_steps"] == 2000].sort_values("seed")["frozen_param_drift"].to_numpy()
        np.testing.assert_allclose(last, (1.0 - factor) * w0, rtol=1e-3)
    assert not leaves_equal(final["params"]["head"], saved["params"]["head"])


@pytest.mark.parametrize("args, expect", [
    (["agent.hidden_sizes=[16]"], ["params/head/kernel", "(8, 2)", "(16, 2)"]),
    (["agent.freeze=[trunk]"], ["'trunk'", "head, torso"]),
    (["agent.init_params=[trunk]"], ["'trunk'", "head, torso"]),
])
def test_bad_init_from_or_freeze_is_one_error_line_and_writes_nothing(source, tmp_path, capsys, args, expect):
    _, src, _ = source
    out = tmp_path / "new"
    code, _, err = cli(["train", "configs/dqn_cartpole.yaml", *TINY_DQN, f"agent.init_from={src}", *args,
                        "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(e in lines[0] for e in expect), lines[0]
    assert not out.exists()


def test_init_from_must_be_a_finished_run_of_the_same_kind(source, tmp_path, capsys):
    _, src, _ = source
    code, _, err = cli(["train", "configs/dqn_cartpole.yaml", *TINY_DQN, f"agent.init_from={tmp_path}",
                        "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "is not a finished run" in err
    code, _, err = cli(["train", "configs/ppo_cartpole.yaml", f"agent.init_from={src}", "--out", str(tmp_path / "b")],
                       capsys)
    assert code == 2 and "is a dqn run and this is a ppo run" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("over, expect", [
    (["agent.weight_decay=0.01"], "agent.optimizer=adamw"),
    (["agent.optimizer=sgd", "agent.momentum=1.0"], "agent.momentum"),
    (["agent.optimizer=rmsprop"], "adam, adamw, sgd"),
    (["agent.freeze=[torso]", "agent.freeze_mode=detach"], "mask, stop_gradient"),
    (["agent.init_params=[torso]"], "agent.init_from"),
])
def test_optimizer_and_freeze_keys_are_validated(over, expect):
    with pytest.raises(UserError, match=expect):
        config_lib.load_config("configs/dqn_cartpole.yaml", over)
