"""Gymnasium environments for the host loop: any registered id, or ``module:Name`` to import.

The host loop (``rlstop.train.host``) steps a gymnasium vector env in Python and calls the
agents' jitted functions. This module turns an ``env`` config into that vector env:

* ``env.id`` is a registered gymnasium id (``CartPole-v1``, ``LunarLander-v3``, ``ALE/Pong-v5``),
  or ``module.path:Name`` -- the module is imported (registering its envs, as gymnasium's own
  ``module:env_id`` syntax does), then ``Name`` is looked up in the registry, or else taken as an
  env class (or factory) that the module defines.
* Sub-environments autoreset in the *same* step (``AutoresetMode.SAME_STEP``): the observation
  returned after an episode ends is the next episode's first one, and the true last observation
  of the ended episode is in ``info["final_obs"]``. The loop bootstraps from that one on a
  time-limit truncation, and never across the episode boundary.
* The vector env is ``SameStepVectorEnv``, a ``gymnasium.vector.VectorEnv`` with exactly
  ``SyncVectorEnv(autoreset_mode=SAME_STEP)``'s results (tested), minus its generic per-step
  machinery (merging every sub-env's info dict, concatenating through the observation space):
  on CartPole that machinery took twice as long as the env's own step, and one env at CleanRL's
  settings steps ~10,000 times a second.
* Atari (ale-py) ids get the standard DQN preprocessing (Mnih et al. 2015; Machado et al. 2018):
  ``AtariPreprocessing`` (30 no-op starts, frame skip 4 with max-pooling, 84x84 grey) and
  ``FrameStackObservation`` of 4, so observations are uint8 [4, 84, 84].
* Episode statistics come from gymnasium's ``RecordEpisodeStatistics`` around each sub-env.

Observation normalisation (``env.normalize_obs``) is an optax-style ``(init, update)`` pair of
running mean and variance kept on the host (``normalizer_init`` / ``normalizer_update``).
"""
from __future__ import annotations

import difflib
import importlib
from typing import NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from gymnasium.wrappers import RecordEpisodeStatistics

from rlstop.errors import UserError

# Largest |reward| of one step where it is known: r_max in the soft-divergence bound
# r_max / (1 - gamma) (van Hasselt et al. 2018). Unknown envs get no soft bound (only
# non-finite values count as divergence): a guess could flag a healthy run.
REWARD_BOUNDS = {
    "CartPole-v1": 1.0,
    "CartPole-v0": 1.0,
    "Acrobot-v1": 1.0,
    "MountainCar-v0": 1.0,
    "Pendulum-v1": 16.2736,
    "MountainCarContinuous-v0": 100.0,
    # A crash or a landing gives +-100 on top of the shaping terms (at most ~ +-100 more in one step).
    "LunarLander-v3": 200.0,
}

EXTRAS = {"box2d": "box2d", "ale_py": "atari", "pygame": "box2d", "cv2": "atari"}


def _import(module: str, env_id: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or module
        extra = EXTRAS.get(missing.split(".")[0])
        hint = f"pip install 'rlstop[{extra}]'" if extra else f"install the package that provides {missing!r}"
        raise UserError(f"env.id={env_id!r} needs the module {missing!r}, which cannot be imported; {hint}") from None


def resolve_spec(env_id: str):
    """The gymnasium ``EnvSpec`` of an ``env.id``: a registered id or ``module.path:Name``."""
    if not isinstance(env_id, str) or not env_id.strip():
        raise UserError(f"env.id={env_id!r} must be a gymnasium id such as CartPole-v1 or module.path:EnvName-v0")
    name = env_id
    module = None
    if ":" in env_id:
        module, name = env_id.split(":", 1)
        mod = _import(module, env_id)
        if name not in gym.registry:
            attr = getattr(mod, name, None)
            if callable(attr):  # an env class or factory the module defines, not registered
                return EnvSpec(id=name.replace(":", "_"), entry_point=attr)
            raise UserError(f"env.id={env_id!r}: importing {module!r} registered no env {name!r} and it "
                            f"defines no {name!r}; registered ids from it include "
                            f"{', '.join(_ids_from(module)[:5]) or 'none'}")
    elif name.startswith("ALE/") and name not in gym.registry:
        gym.register_envs(_import("ale_py", env_id))
    if name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"unknown env id {env_id!r}; {hint}give a registered gymnasium id "
                        "(e.g. CartPole-v1, LunarLander-v3, ALE/Pong-v5) or module.path:EnvName-v0")
    return gym.spec(name)


def _ids_from(module: str) -> list[str]:
    return [k for k, s in gym.registry.items()
            if isinstance(s.entry_point, str) and s.entry_point.startswith(module)]


def is_atari(spec) -> bool:
    ep = spec.entry_point
    return isinstance(ep, str) and ep.startswith("ale_py")


class GymnasiumEnv:
    """What the host loop and the agents need to know about a gymnasium env, and its factories.

    Attributes mirror ``GymnaxEnv``: ``id``, ``obs_shape``, ``discrete``, ``num_actions`` or
    ``action_shape`` / ``action_low`` / ``action_high``, ``max_episode_steps``, ``reward_bound``;
    plus ``obs_dtype`` (uint8 for images, else float32) and ``image``.
    """

    backend = "gymnasium"

    def __init__(self, env_id: str):
        self.id = env_id
        self.spec = resolve_spec(env_id)
        self.atari = is_atari(self.spec)
        probe = self.make()
        try:
            obs_space, act_space = probe.observation_space, probe.action_space
            self.max_episode_steps = probe.spec.max_episode_steps if probe.spec is not None else None
        finally:
            probe.close()
        if not isinstance(obs_space, gym.spaces.Box):
            raise UserError(f"env.id={env_id!r} has a {type(obs_space).__name__} observation space; "
                            "the agents here read Box observations (flatten it with a wrapper in your module)")
        self.obs_shape = tuple(int(d) for d in obs_space.shape)
        self.image = obs_space.dtype == np.uint8 and len(self.obs_shape) == 3
        self.obs_dtype = np.uint8 if self.image else np.float32
        if isinstance(act_space, gym.spaces.Discrete):
            self.discrete = True
            self.num_actions = int(act_space.n)
            self.action_start = int(act_space.start)
        elif isinstance(act_space, gym.spaces.Box):
            self.discrete = False
            self.action_shape = tuple(int(d) for d in act_space.shape)
            self.action_low = np.asarray(act_space.low, np.float32)
            self.action_high = np.asarray(act_space.high, np.float32)
        else:
            raise UserError(f"env.id={env_id!r} has a {type(act_space).__name__} action space; "
                            "the agents here take Discrete or Box actions")
        self.reward_bound = REWARD_BOUNDS.get(self.spec.id, float("inf"))

    def make(self, **kwargs):
        """One environment with the standard wrappers (time limit from its spec; Atari preprocessing)."""
        try:
            if self.atari:
                from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

                _import("cv2", self.id)
                env = gym.make(self.spec, frameskip=1, **kwargs)  # AtariPreprocessing skips frames itself
                return FrameStackObservation(AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                                                terminal_on_life_loss=False, grayscale_obs=True),
                                             stack_size=4)
            return gym.make(self.spec, **kwargs)
        except gym.error.DependencyNotInstalled as e:
            extra = "atari" if self.atari else "box2d" if "box2d" in str(e).lower() else None
            hint = f"pip install 'rlstop[{extra}]'" if extra else str(e).splitlines()[0]
            raise UserError(f"env.id={self.id!r} needs a package that is not installed; {hint}") from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's env failing to build is bad input
            raise UserError(f"env.id={self.id!r} could not be created: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}; check its constructor") from None

    def make_vector(self, num_envs: int) -> "SameStepVectorEnv":
        """``num_envs`` sub-environments stepped in this process, autoresetting in the same step,
        with episode statistics in ``info["final_info"]["episode"]``."""
        # Statistics per sub-env: gymnasium 1.3's vector RecordEpisodeStatistics assumes next-step
        # autoreset and drops the first reward of every episode after the first under SAME_STEP
        # (fixed upstream later: Farama-Foundation/Gymnasium#1624). The sub-env's own wrapper is
        # exact; its info arrives in info["final_info"].
        return SameStepVectorEnv([lambda: RecordEpisodeStatistics(self.make())] * num_envs)

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        """An agent's action [N] (indices from 0) or [N, *action_shape] as the env takes it."""
        if self.discrete:
            return action + self.action_start if self.action_start else action
        return action


class SameStepVectorEnv(gym.vector.VectorEnv):
    """Sub-envs stepped one after another in this process, autoresetting in the same step.

    The results of ``gymnasium.vector.SyncVectorEnv(env_fns, autoreset_mode=SAME_STEP, copy=False)``:
    ``step`` returns the observation to act on next (an ended sub-env's reset observation), and
    where an episode ended ``info`` holds ``final_obs`` / ``final_info`` (merged as SyncVectorEnv
    merges them) and the reset's info. One difference: the sub-envs' infos of steps where no
    episode ended are not merged into ``info`` (the host loop reads none). The returned
    observation array is this env's buffer, overwritten by the next step (as with ``copy=False``).
    """

    def __init__(self, env_fns):
        self.envs = [fn() for fn in env_fns]
        self.num_envs = len(self.envs)
        first = self.envs[0]
        self.metadata = {**first.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}
        self.render_mode = first.render_mode
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        space = self.single_observation_space
        self._obs = np.zeros((self.num_envs,) + space.shape, space.dtype)
        self._rewards = np.zeros(self.num_envs, np.float64)
        self._terminations = np.zeros(self.num_envs, np.bool_)
        self._truncations = np.zeros(self.num_envs, np.bool_)

    def reset(self, *, seed=None, options=None):
        if seed is None or isinstance(seed, int):  # as SyncVectorEnv: seed + i for sub-env i
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        for i, (env, s) in enumerate(zip(self.envs, seed)):
            self._obs[i] = env.reset(seed=s, options=options)[0]
        return self._obs, {}

    def step(self, actions):
        obs, rewards, terms, truncs = self._obs, self._rewards, self._terminations, self._truncations
        ended = None
        for i, env in enumerate(self.envs):
            o, rewards[i], terms[i], truncs[i], info = env.step(actions[i])
            if terms[i] or truncs[i]:
                ended = ended or []
                ended.append((i, o, info))
            else:
                obs[i] = o
        infos = {}
        for i, o, info in ended or ():  # as SyncVectorEnv: the ended episode's, then the reset's info
            infos = self._add_info(infos, {"final_obs": o, "final_info": info}, i)
            obs[i], reset_info = self.envs[i].reset()
            infos = self._add_info(infos, reset_info, i)
        return obs, rewards.copy(), terms.copy(), truncs.copy(), infos

    def close_extras(self, **kwargs):
        for env in self.envs:
            env.close()


def step_vector(envs, action):
    """Step a SAME_STEP vector env.

    Returns ``(obs, next_obs, reward, terminated, truncated, ended)``: ``obs`` is what to act on
    next (a new episode's first observation where one ended; with ``copy=False`` it is the vector
    env's own buffer, valid until the next step), ``next_obs`` the true next observation of each
    transition (the final one where an episode ended; ``obs`` itself when none did), and
    ``ended`` the returns of the episodes that ended (from each sub-env's ``RecordEpisodeStatistics``).
    """
    obs, reward, terminated, truncated, info = envs.step(action)
    if "final_obs" not in info:
        return obs, obs, reward, terminated, truncated & ~terminated, ()
    next_obs = obs.copy()
    for i in np.flatnonzero(info["_final_obs"]):
        next_obs[i] = info["final_obs"][i]
    final = info["final_info"]
    ended = final["episode"]["r"][final["_episode"]] if "_episode" in final else ()
    return obs, next_obs, reward, terminated, truncated & ~terminated, ended


# -- observation normalisation: (init, update) over a running mean and variance ------------------

class NormState(NamedTuple):
    mean: np.ndarray
    var: np.ndarray
    count: float


def normalizer_init(shape: tuple) -> NormState:
    return NormState(np.zeros(shape, np.float64), np.ones(shape, np.float64), 1e-4)


def normalizer_update(state: NormState, batch: np.ndarray) -> NormState:
    """Merge a batch [N, ...] into the running moments (Chan et al.'s parallel algorithm)."""
    b_mean, b_var, n = batch.mean(0), batch.var(0), batch.shape[0]
    delta = b_mean - state.mean
    total = state.count + n
    mean = state.mean + delta * n / total
    m2 = state.var * state.count + b_var * n + delta**2 * state.count * n / total
    return NormState(mean, m2 / total, total)


def normalize(state: NormState, x: np.ndarray, clip: float = 10.0) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-8), clipped to [-clip, clip] (gymnasium's NormalizeObservation)."""
    return np.clip((x - state.mean) / np.sqrt(state.var + 1e-8), -clip, clip).astype(np.float32)

