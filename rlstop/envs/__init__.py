"""One environment interface for the loops: gymnax (jitted), gymnasium (host side), finite MDPs."""
from __future__ import annotations

from rlstop.errors import UserError

MDP_IDS = ("baird", "two_state", "finite_mdp")


def gymnax_ids() -> list[str]:
    import gymnax

    return list(gymnax.registered_envs)


def resolve_backend(env_cfg) -> str:
    """``auto`` -> mdp for the finite MDPs, gymnax when it has the id, else gymnasium."""
    if env_cfg.backend != "auto":
        return env_cfg.backend
    if env_cfg.id in MDP_IDS:
        return "mdp"
    if env_cfg.id in gymnax_ids():
        return "gymnax"
    return "gymnasium"


def make_env(env_cfg):
    """The jitted-loop env for a config (gymnax or an MDP)."""
    backend = resolve_backend(env_cfg)
    if backend == "gymnax":
        from rlstop.envs.gymnax_env import GymnaxEnv

        return GymnaxEnv(env_cfg.id)
    if backend == "mdp":
        from rlstop.envs.mdp import make_mdp

        return make_mdp(env_cfg.id, env_cfg.mdp)
    raise UserError(f"env.id={env_cfg.id!r} is a gymnasium env (env.backend={backend}): `rlstop train` and "
                    "`rlstop sweep` run it on the host loop, but this needs a JAX-native (gymnax) env")


def check(cfg) -> None:
    """Bad env input as a ``UserError`` before anything is trained or written: an unknown id, or an
    agent that cannot take the env's action space (DQN needs discrete actions). Cheap: it builds
    one env and steps nothing."""
    backend = resolve_backend(cfg.env)
    if backend == "gymnasium":
        from rlstop.envs.gymnasium_env import GymnasiumEnv

        env = GymnasiumEnv(cfg.env.id)
    elif backend == "gymnax":
        env = make_env(cfg.env)
    else:
        return
    if cfg.agent.kind == "dqn" and not env.discrete:
        raise UserError(f"DQN needs a discrete action space; {cfg.env.id} has continuous actions "
                        "(use agent.kind=ppo or a2c)")
