"""What `rlstop list` prints: agents, envs, configs, switches."""
from __future__ import annotations

import glob
import importlib

from rlstop import config as config_lib


def describe() -> str:
    lines = ["agents (agent.kind) and their switches (agent.<switch>, true by default unless noted):"]
    for kind, mod in config_lib.AGENT_MODULES.items():
        try:
            cls = importlib.import_module(mod).config_class(kind)
        except (ImportError, AttributeError):
            continue
        defaults = cls()
        sw = ", ".join(f"{s}={'true' if getattr(defaults, s) else 'false'}" for s in cls.SWITCHES)
        lines.append(f"  {kind:5s} {sw}")
    from rlstop.envs import MDP_IDS, gymnax_ids

    lines.append("envs:")
    lines.append("  gymnax (env.backend=gymnax, jitted): " + ", ".join(sorted(gymnax_ids())))
    lines.append("  gymnasium (env.backend=gymnasium): any registered id or module:Env-vN")
    lines.append("  finite MDPs (env.backend=mdp): " + ", ".join(MDP_IDS))
    here = [p for p in sorted(glob.glob("configs/*.yaml")) + sorted(glob.glob("configs/sweeps/*.yaml"))]
    if here:
        lines.append("configs (in ./configs):")
        lines += [f"  {p}" for p in here]
    lines.append("common keys: " + ", ".join(f"train.{k}" for k in config_lib.TrainConfig.__dataclass_fields__)
                 + ", " + ", ".join(f"env.{k}" for k in config_lib.EnvConfig.__dataclass_fields__))
    return "\n".join(lines)
