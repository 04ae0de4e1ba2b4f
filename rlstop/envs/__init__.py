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
    raise UserError(f"env.backend={backend!r} has no jitted loop here; use the host loop")
