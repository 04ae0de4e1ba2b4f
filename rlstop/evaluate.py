"""`rlstop eval RUN_DIR`: greedy evaluation of a finished run from its final checkpoint."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from rlstop import config as config_lib
from rlstop import results
from rlstop.errors import UserError


def load(run_dir: str):
    """(config, env, program, runner) of a finished run, restored from checkpoints/final."""
    from rlstop.train import checkpoints, driver

    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise UserError(f"{run_dir!r} is not a run folder (no config.yaml); give a folder written by `rlstop train`")
    data = config_lib._read_yaml(os.path.join(run_dir, "config.yaml"))
    cfg = config_lib.build_config(data, source=os.path.join(run_dir, "config.yaml"))
    if driver.resolve_backend(cfg.env) == "gymnasium":
        raise UserError(f"{run_dir} trained on the gymnasium backend, whose host loop keeps no final checkpoint "
                        "yet; `rlstop eval` reads runs of gymnax envs and finite MDPs (its metrics.csv has "
                        "eval_return)")
    if cfg.train.x64:
        jax.config.update("jax_enable_x64", True)
    env = driver.make_env(cfg.env)
    hp, axes = driver.batch_hparams([cfg])
    program = driver.make_program(cfg, env, driver.varying_keys(axes))
    keys = driver.batch_keys([cfg])
    like = jax.jit(driver.batched(program.init, keys.shape[0], (0, axes)))(keys, hp)
    ckpt = os.path.join(run_dir, "checkpoints", "final")
    runner = checkpoints.load_final(ckpt, like) if os.path.isdir(ckpt) else None
    if runner is None:
        raise UserError(f"{run_dir} has no final checkpoint (checkpoints/final); rerun its command to finish it")
    return cfg, env, program, runner, hp, axes


def main(run_dir: str, episodes: int, gif: str | None) -> dict:
    if episodes < 1:
        raise UserError(f"--episodes={episodes} must be >= 1")
    cfg, env, program, runner, hp, axes = load(run_dir)
    if program.evaluate is None:
        raise UserError(f"agent.kind={cfg.agent.kind} predicts values; it has no policy to evaluate "
                        f"(see {run_dir}/summary.json for its final weights and values)")
    from rlstop.train import driver

    cfg_eval = config_lib.replace(cfg, {"train.eval_episodes": episodes})
    program = driver.make_program(cfg_eval, env, driver.varying_keys(axes))
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 0xE7A1))(driver.batch_keys([cfg]))
    evaluate = jax.jit(driver.batched(program.evaluate, keys.shape[0], (0, 0, axes)))
    returns = np.asarray(evaluate(runner.agent.params, keys, hp)).reshape(-1)
    seeds = [cfg.train.seed + i for i in range(cfg.train.seeds)]
    for s, r in zip(seeds, returns):
        print(f"seed {s}: mean greedy return over {episodes} episodes = {r:.2f}")
    print(f"mean over seeds: {returns.mean():.2f}")
    if gif:
        render_gif(cfg, env, runner, gif)
        print(f"wrote {gif}")
    out = {"seeds": seeds, "episodes": episodes, "returns": returns.tolist()}
    results.write_json(os.path.join(run_dir, "eval.json"), out)
    return out


def render_gif(cfg, env, runner, path: str, max_frames: int = 500) -> None:
    """One greedy episode of the first seed, rendered by gymnasium's rgb_array mode."""
    import gymnasium as gym
    from matplotlib import animation
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlstop.train.driver import LOOPS
    import importlib

    policy_fn = getattr(importlib.import_module(LOOPS[cfg.agent.kind]), "greedy_policy", None)
    if policy_fn is None:
        raise UserError(f"--gif is not available for agent.kind={cfg.agent.kind}")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        genv = gym.make(cfg.env.id, render_mode="rgb_array")
        genv.reset(seed=cfg.train.seed)
        genv.render()
    except Exception as e:  # noqa: BLE001 - any failure to build the renderer is the user's env
        raise UserError(f"cannot render {cfg.env.id} with gymnasium ({str(e).splitlines()[0]}); "
                        'install the renderer with pip install "rlstop[render]" or drop --gif') from None
    first = jax.tree.map(lambda x: x[0], runner)
    policy = jax.jit(policy_fn(cfg, env, first))
    obs, _ = genv.reset(seed=cfg.train.seed)
    frames = [genv.render()]
    for _ in range(max_frames):
        action = np.asarray(policy(jnp.asarray(obs, jnp.float32)[None]))[0]
        obs, _, terminated, truncated, _ = genv.step(action.item() if action.ndim == 0 else action)
        frames.append(genv.render())
        if terminated or truncated:
            break
    genv.close()
    fig = plt.figure(figsize=(frames[0].shape[1] / 100, frames[0].shape[0] / 100), dpi=100)
    plt.axis("off")
    im = plt.imshow(frames[0])

    def draw(i):
        im.set_data(frames[i])
        return (im,)

    anim = animation.FuncAnimation(fig, draw, frames=len(frames), interval=20, blit=True)
    anim.save(path, writer=animation.PillowWriter(fps=50))
    plt.close(fig)
