#!/usr/bin/env python3
"""Peer runner: rejax 0.1.3 DQN / PPO on gymnax CartPole-v1, timed.

Run with the rejax venv's interpreter (see rejax-requirements.txt beside this
file), not with rlstop's venv -- rejax 0.1.3 needs gymnax<1:

    /work/rejax-venv/bin/python scripts/peers/rejax_peer.py --algo dqn --seeds 16

Prints exactly ONE JSON line on stdout.  Everything else (warnings about
settings that cannot be matched, progress) goes to stderr.

Timing protocol
  compile_s : jax.jit(f).lower(keys) + .compile()   (tracing + XLA compile)
  run_s     : one call of the compiled executable, jax.block_until_ready'ed.
              It includes rejax's single final evaluation (128 episodes,
              vmapped) because rejax runs it inside train(); eval_freq is set to
              the whole run so that there is exactly one evaluation and no
              initial one.
  f         : seeds == 1 -> algo.train on one key (no vmap; rejax README's
              single-seed way, keeps lax.cond as real branches)
              seeds  > 1 -> jax.vmap(algo.train) over `seeds` different keys
              (rejax README's multi-seed way).  --vmap-single vmaps 1 seed too.
  env_steps_per_s = seeds * env_steps_executed / run_s   (aggregate over seeds)

Matched settings (see SETTINGS below and the stderr warnings):
  DQN: CleanRL dqn_jax CartPole.  rejax's DQN does num_epochs gradient updates
       after every num_envs env steps, so "1 env, one update every 10 env
       steps" has no config knob.  --dqn-mode picks how to get it:
         matched  (default) rejax DQN subclass whose train iteration steps the
                  single env `train_freq`=10 times (rejax's own
                  collect_transitions / replay buffer / update /
                  target-update code), then does one rejax update.
         native10 pure rejax config: num_envs=10, num_epochs=1 -> one update
                  per 10 env steps, but 10 envs stepped in parallel.
         native1  pure rejax config: num_envs=1, num_epochs=1 -> one update
                  per env step (10x CleanRL's update count).
  PPO: rejax's PPO defaults (64 envs x 64 steps, 8 epochs, 16 minibatches,
       lr 3e-4, ...) with tanh activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata


def warn(msg: str) -> None:
    print(f"[rejax_peer] WARNING: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    print(f"[rejax_peer] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", choices=("dqn", "ppo"), required=True)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--total-steps", type=int, default=500_000,
                   help="env steps per seed (default 500000)")
    p.add_argument("--seed", type=int, default=0,
                   help="base PRNG seed; seed i uses fold_in(PRNGKey(seed), i)")
    p.add_argument("--dqn-mode", choices=("matched", "native10", "native1"),
                   default="matched")
    p.add_argument("--vmap-single", action="store_true",
                   help="vmap over a batch of 1 key when --seeds 1")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    if a.total_steps < 1:
        p.error("--total-steps must be >= 1")
    return a


# --------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------

DQN_TRAIN_FREQ = 10  # CleanRL train_frequency


def dqn_config(total_steps: int, mode: str):
    """rejax DQN config matched to CleanRL dqn_jax.py on CartPole-v1."""
    if mode == "matched":
        num_envs, num_epochs, steps_per_iter = 1, 1, DQN_TRAIN_FREQ
    elif mode == "native10":
        num_envs, num_epochs, steps_per_iter = DQN_TRAIN_FREQ, 1, DQN_TRAIN_FREQ
    else:  # native1
        num_envs, num_epochs, steps_per_iter = 1, 1, 1
    iters = total_steps // steps_per_iter
    if iters < 1:
        raise SystemExit(f"--total-steps {total_steps} < one iteration ({steps_per_iter})")
    executed = iters * steps_per_iter
    cfg = dict(
        env="CartPole-v1",
        agent="QNetwork",                     # plain MLP Q-net, not dueling
        agent_kwargs={"activation": "relu"},  # hidden (64, 64) is rejax's fixed size
        num_envs=num_envs,
        num_epochs=num_epochs,                # gradient updates per iteration
        total_timesteps=executed,
        eval_freq=executed,                   # one evaluation, at the end
        skip_initial_evaluation=True,
        learning_rate=2.5e-4,
        batch_size=128,
        buffer_size=10_000,
        fill_buffer=10_000,                   # CleanRL learning_starts
        target_update_freq=500,               # in env steps
        polyak=0.0,                           # rejax: target = polyak*target + (1-polyak)*online -> hard copy (CleanRL tau=1)
        eps_start=1.0,
        eps_end=0.05,
        exploration_fraction=0.5,             # of total_timesteps -> 250k steps
        gamma=0.99,
        ddqn=False,
        max_grad_norm=float("inf"),           # CleanRL: no clipping (rejax default)
        normalize_observations=False,
        normalize_rewards=False,
    )
    notes = []
    if mode == "matched":
        notes.append("DQN train frequency: CleanRL's one update per 10 env steps has no "
                     "rejax config knob; using a rejax DQN subclass (TrainFreqDQN) that "
                     "steps the 1 env 10 times per iteration, then does one update")
    elif mode == "native10":
        notes.append("DQN --dqn-mode native10: one update per 10 env steps via 10 parallel "
                     "envs (not CleanRL's 1 env)")
    else:
        notes.append("DQN --dqn-mode native1: one update per env step (10x CleanRL's "
                     "update count)")
    notes += [
        "DQN loss: rejax uses optax.l2_loss = 0.5*(q-target)^2, CleanRL uses "
        "mse = (q-target)^2; gradients differ by a factor 2 (Adam is nearly "
        "scale-invariant, not matchable by config)",
        "DQN exploration before learning starts: rejax acts uniformly at random "
        "for the first fill_buffer=10000 steps; CleanRL uses the epsilon schedule "
        "(epsilon ~1.0-0.96 there) from step 0 (not matchable by config)",
        "DQN evaluation: rejax's greedy eval uses epsilon=0.005 (hard-coded in "
        "DQN.make_act), 128 episodes",
    ]
    return cfg, executed, notes


def ppo_config(total_steps: int):
    num_envs, num_steps = 64, 64
    batch = num_envs * num_steps
    iters = total_steps // batch
    if iters < 1:
        raise SystemExit(f"--total-steps {total_steps} < one PPO iteration ({batch})")
    executed = iters * batch
    cfg = dict(
        env="CartPole-v1",
        agent_kwargs={"activation": "tanh", "hidden_layer_sizes": (64, 64)},
        num_envs=num_envs,
        num_steps=num_steps,
        num_epochs=8,
        num_minibatches=16,
        total_timesteps=executed,
        eval_freq=executed,                   # one evaluation, at the end
        skip_initial_evaluation=True,
        learning_rate=3e-4,
        gamma=0.99,
        gae_lambda=0.95,
        clip_eps=0.2,
        vf_coef=0.5,
        ent_coef=0.01,
        max_grad_norm=0.5,
        normalize_observations=False,
        normalize_rewards=False,
    )
    notes = [
        "PPO max_grad_norm=0.5: rejax 0.1.3 applies it as optax.clip(0.5), i.e. "
        "ELEMENT-WISE gradient value clipping, not clip_by_global_norm (not "
        "matchable by config)",
        "PPO: rejax uses separate actor and critic networks with separate Adam "
        "optimizers and separate losses (vf_coef scales the critic loss only), "
        "per-minibatch advantage normalisation and clipped value loss",
    ]
    if executed != total_steps:
        notes.append(f"PPO total steps: {total_steps} is not a multiple of "
                     f"{batch} (64 envs x 64 steps); running floor = {iters} "
                     f"iterations = {executed} env steps")
    return cfg, executed, notes


# --------------------------------------------------------------------------
# DQN with CleanRL's train frequency, built from rejax's own pieces
# --------------------------------------------------------------------------

def make_train_freq_dqn():
    import jax
    import numpy as np
    from flax import struct
    from jax import numpy as jnp
    import rejax

    class TrainFreqDQN(rejax.DQN):
        """rejax.DQN whose iteration = `train_freq` single-env steps + num_epochs updates.

        Identical to rejax 0.1.3 DQN.train_iteration except that transitions
        are collected train_freq times (a lax.scan, each step with its own
        epsilon) before the update, and train() divides eval_freq by
        num_envs * train_freq.  The update gate `global_step > fill_buffer`
        is evaluated after the collection, so with fill_buffer=10000 and
        train_freq=10 updates happen at env steps 10010, 10020, ..., like
        CleanRL's `global_step > learning_starts and global_step % 10 == 0`.
        """

        train_freq: int = struct.field(pytree_node=False, default=DQN_TRAIN_FREQ)

        def train_iteration(self, ts):
            old_global_step = ts.global_step

            def env_step(ts, _):
                start_training = ts.global_step > self.fill_buffer
                epsilon = self.epsilon_schedule(ts.global_step)
                ts, batch = self.collect_transitions(
                    ts, epsilon, uniform=jnp.logical_not(start_training))
                ts = ts.replace(replay_buffer=ts.replay_buffer.extend(batch))
                return ts, None

            ts, _ = jax.lax.scan(env_step, ts, None, self.train_freq)
            start_training = ts.global_step > self.fill_buffer

            def update_iteration(ts):
                rng, rng_sample = jax.random.split(ts.rng)
                ts = ts.replace(rng=rng)
                minibatch = ts.replay_buffer.sample(self.batch_size, rng_sample)
                if self.normalize_observations:
                    minibatch = minibatch._replace(
                        obs=self.normalize_obs(ts.obs_rms_state, minibatch.obs),
                        next_obs=self.normalize_obs(ts.obs_rms_state, minibatch.next_obs),
                    )
                return self.update(ts, minibatch)

            def do_updates(ts):
                return jax.lax.fori_loop(
                    0, self.num_epochs, lambda _, ts: update_iteration(ts), ts)

            ts = jax.lax.cond(start_training, lambda: do_updates(ts), lambda: ts)
            ts = ts.replace(
                q_target_params=self.maybe_update_target_params(
                    ts.q_ts.params, ts.q_target_params, ts.global_step, old_global_step
                )
            )
            return ts

        def train(self, rng=None, train_state=None):
            # rejax 0.1.3 ReplayBufferMixin.train with steps/iteration = num_envs*train_freq
            if train_state is None and rng is None:
                raise ValueError("Either train_state or rng must be provided")
            ts = train_state or self.init_state(rng)
            steps_per_iter = self.num_envs * self.train_freq

            if not self.skip_initial_evaluation:
                initial_evaluation = self.eval_callback(self, ts, ts.rng)

            def eval_iteration(ts, unused):
                ts = jax.lax.fori_loop(
                    0,
                    int(np.ceil(self.eval_freq / steps_per_iter)),
                    lambda _, ts: self.train_iteration(ts),
                    ts,
                )
                return ts, self.eval_callback(self, ts, ts.rng)

            ts, evaluation = jax.lax.scan(
                eval_iteration, ts, None,
                int(np.ceil(self.total_timesteps / self.eval_freq)))

            if not self.skip_initial_evaluation:
                evaluation = jax.tree.map(
                    lambda i, ev: jnp.concatenate((jnp.expand_dims(i, 0), ev)),
                    initial_evaluation, evaluation)
            return ts, evaluation

    return TrainFreqDQN


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)

    import jax
    import numpy as np
    import rejax

    if args.algo == "dqn":
        cfg, executed, notes = dqn_config(args.total_steps, args.dqn_mode)
        if args.dqn_mode == "matched":
            algo_cls = make_train_freq_dqn()
            cfg["train_freq"] = DQN_TRAIN_FREQ
        else:
            algo_cls = rejax.get_algo("dqn")
        updates_per_seed = max(0, (executed - cfg["fill_buffer"])) // (
            DQN_TRAIN_FREQ if args.dqn_mode != "native1" else 1)
    else:
        cfg, executed, notes = ppo_config(args.total_steps)
        algo_cls = rejax.get_algo("ppo")
        iters = executed // (cfg["num_envs"] * cfg["num_steps"])
        updates_per_seed = iters * cfg["num_epochs"] * cfg["num_minibatches"]

    for n in notes:
        warn(n)

    algo = algo_cls.create(**cfg)

    # Check that rejax really took the settings (it silently keeps fields).
    for k, v in cfg.items():
        if k in ("env", "agent", "agent_kwargs"):
            continue
        got = getattr(algo, k)
        if not (got == v or (isinstance(v, float) and float(got) == v)):
            warn(f"config {k}: asked {v!r}, rejax has {got!r}")

    base = jax.random.PRNGKey(args.seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(args.seeds))
    vmapped = args.seeds > 1 or args.vmap_single
    if vmapped:
        fn, arg = jax.vmap(algo.train), keys
    else:
        fn, arg = algo.train, keys[0]

    info(f"{args.algo} seeds={args.seeds} vmapped={vmapped} env_steps/seed={executed} "
         f"backend={jax.default_backend()} loadavg={os.getloadavg()}")

    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(arg)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    info(f"compiled in {t2 - t0:.2f}s (trace/lower {t1 - t0:.2f}s)")

    t3 = time.perf_counter()
    out = jax.block_until_ready(compiled(arg))
    t4 = time.perf_counter()
    ts, (lengths, returns) = out
    run_s = t4 - t3

    returns = np.asarray(returns)  # [seeds?, num_evals, 128]
    if not vmapped:
        returns = returns[None]
    final = returns[:, -1, :]  # last evaluation
    steps_done = np.asarray(ts.global_step).reshape(-1)
    if not np.all(steps_done == executed):
        warn(f"global_step at end {steps_done.tolist()} != planned {executed}")

    load = os.getloadavg()
    result = {
        "algo": args.algo,
        "seeds": args.seeds,
        "total_steps": args.total_steps,
        "compile_s": round(t2 - t0, 4),
        "run_s": round(run_s, 4),
        "env_steps_per_s": round(args.seeds * executed / run_s, 1),
        "final_eval_return_mean": round(float(final.mean()), 3),
        "rejax_version": metadata.version("rejax"),
        "jax_version": jax.__version__,
        # extras
        "env_steps_executed": int(executed),
        "grad_updates_per_seed": int(updates_per_seed),
        "vmapped": vmapped,
        "dqn_mode": args.dqn_mode if args.algo == "dqn" else None,
        "lower_s": round(t1 - t0, 4),
        "xla_compile_s": round(t2 - t1, 4),
        "final_eval_return_per_seed": [round(float(x), 2) for x in final.mean(axis=1)],
        "gymnax_version": metadata.version("gymnax"),
        "backend": jax.default_backend(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "unmatched": notes,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
