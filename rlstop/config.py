"""Configuration: OmegaConf structured configs (typed dataclasses), YAML files, ``key=value`` overrides.

A run's config has four sections: ``name``, ``agent`` (its schema depends on ``agent.kind``),
``env`` and ``train``. Configs are frozen once loaded; derived values are computed where they are
needed and never written back (STYLE.md, point 6).

Every agent config class declares two class attributes:

* ``TRACED``: the fields that only change values (learning rate, gamma, the boolean switches...).
  Inside the compiled train function they are traced arguments, so runs that differ only in them
  share one compile and are vmapped together.
* ``SWITCHES``: the boolean stop-gradient / target switches (a subset of ``TRACED``) that
  ``rlstop ablate`` turns off one at a time.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlstop.errors import UserError

AGENT_MODULES = {
    "dqn": "rlstop.agents.dqn",
    "a2c": "rlstop.agents.actor_critic",
    "ppo": "rlstop.agents.actor_critic",
    "td": "rlstop.agents.td",
}
BACKENDS = ("auto", "gymnax", "gymnasium", "mdp")


@dataclass(frozen=True)
class EnvConfig:
    id: str = "CartPole-v1"
    backend: str = "auto"
    num_envs: int = 1
    normalize_obs: bool = False
    mdp: Optional[dict] = None  # a finite MDP given in YAML (env.id: finite_mdp)


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 500_000    # env steps (for expected/DP updates: updates)
    seeds: int = 1                # how many seeds, vmapped in one call
    seed: int = 0                 # the first seed; seeds are seed, seed+1, ...
    log_every: int = 10_000       # env steps between logged rows of metrics.csv
    eval_every: int = 0           # env steps between greedy evaluations; 0 = every log point
    eval_episodes: int = 10
    checkpoint_every: int = 0     # env steps between checkpoints; 0 = only at the end
    x64: bool = False
    tensorboard: bool = False


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    agent: Any = None
    env: EnvConfig = field(default_factory=EnvConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def agent_config_class(kind: str):
    if not isinstance(kind, str) or kind not in AGENT_MODULES:
        close = difflib.get_close_matches(str(kind), AGENT_MODULES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown agent.kind {kind!r}; {hint}choose one of {', '.join(AGENT_MODULES)}")
    return importlib.import_module(AGENT_MODULES[kind]).config_class(kind)


def _valid_keys(schema: DictConfig) -> list[str]:
    keys = []
    for section in ("name", "agent", "env", "train"):
        node = schema._get_node(section)
        if isinstance(node, DictConfig):
            keys += [f"{section}.{k}" for k in node.keys()]
        else:
            keys.append(section)
    return keys


def _closest(key: str, valid: list[str]) -> str:
    scored = sorted(((difflib.SequenceMatcher(None, key, v).ratio(), v) for v in valid), reverse=True)
    # the best matches, and any other nearly as close
    close = [v for r, v in scored[:3] if r >= 0.6 and r >= scored[0][0] - 0.05]
    if not close:  # try the last component alone (agent.lr -> agent.learning_rate is too far)
        last = key.rsplit(".", 1)[-1]
        close = [v for v in valid if last in v.rsplit(".", 1)[-1]][:3]
    return f"did you mean {' or '.join(close)}?" if close else "run `rlstop list` for the valid keys"


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found; give the path of a YAML file (see configs/)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (name, agent, env, train), got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> dict:
    """``["agent.gamma=0.9", ...]`` -> nested dict, values parsed as YAML (so 1e-3, true, [1,2] work)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r} is not of the form key=value (e.g. agent.learning_rate=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads 1e-3 as a string; accept it as a number as users expect.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} sets a key below a value; check the key {key!r}")
        node[parts[-1]] = value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key_error_message(e: OmegaConfBaseException, schema: DictConfig) -> str:
    full_key = getattr(e, "full_key", None) or ""
    return f"unknown config key {full_key!r}; {_closest(full_key, _valid_keys(schema))}"


def build_config(data: dict, *, source: str = "config") -> RunConfig:
    """Validate a nested dict (YAML + overrides already merged) into a frozen RunConfig."""
    data = dict(data)
    unknown = [k for k in data if k not in ("name", "agent", "env", "train")]
    if unknown:
        valid = ["name", "agent", "env", "train"]
        raise UserError(f"unknown top-level section {unknown[0]!r} in {source}; valid sections are {', '.join(valid)}")
    agent = data.get("agent") or {}
    if not isinstance(agent, dict):
        raise UserError(f"'agent' in {source} must be a mapping with at least 'kind'")
    if "kind" not in agent:
        raise UserError(f"agent.kind is missing in {source}; set it to one of {', '.join(AGENT_MODULES)}")
    cls = agent_config_class(agent["kind"])
    for section in ("env", "train"):
        if section in data and not isinstance(data[section], dict):
            raise UserError(f"'{section}' in {source} must be a mapping of keys to values")
    env = data.get("env") or {}
    if env.get("mdp") is not None and not isinstance(env["mdp"], dict):
        raise UserError("env.mdp must be a mapping (gamma, transitions, rewards, ...); see configs/random_walk.yaml")
    schema = OmegaConf.structured(RunConfig(agent=cls()))
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(data))
    except ConfigKeyError as e:
        raise UserError(_key_error_message(e, schema)) from None
    except ValidationError as e:
        key = getattr(e, "full_key", "") or "?"
        expected = _type_name(schema, key)
        raise UserError(f"{key}: cannot use {_short_value(e)} here, it must be {expected}; fix the value") from None
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise UserError(f"invalid config in {source}: {str(e).splitlines()[0]}") from None
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise UserError(f"invalid config in {source}: {str(e).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def _type_name(schema: DictConfig, key: str) -> str:
    try:
        node = schema
        for p in key.split("."):
            node = node._get_node(p)
        t = node._metadata.ref_type
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
            t, getattr(t, "__name__", str(t)).replace("List", "a list").replace("Optional", "optional")
        )
    except Exception:  # noqa: BLE001 - best effort for the message only
        return "of the type the schema gives"


def _short_value(e: ValidationError) -> str:
    msg = str(e).splitlines()[0]
    if msg.startswith("Value '"):
        return repr(msg.split("'")[1])
    return "that value"


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    data = _read_yaml(path)
    data = _deep_merge(data, parse_overrides(overrides or []))
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return build_config(data, source=path)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def validate(cfg: RunConfig) -> None:
    """Impossible values -> UserError naming the key and the fix."""
    t, e = cfg.train, cfg.env
    _check(isinstance(cfg.name, str) and cfg.name.strip() != "" and "/" not in cfg.name,
           f"name {cfg.name!r} must be a non-empty folder name without '/'")
    _check(t.seeds >= 1, f"train.seeds={t.seeds} is impossible; use a positive number of seeds, e.g. train.seeds=4")
    _check(t.seed >= 0, f"train.seed={t.seed} must be >= 0")
    _check(t.total_steps >= 1, f"train.total_steps={t.total_steps} must be positive")
    _check(t.log_every >= 1, f"train.log_every={t.log_every} must be positive")
    _check(t.log_every <= t.total_steps,
           f"train.log_every={t.log_every} exceeds train.total_steps={t.total_steps}; lower train.log_every")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 = at every log point)")
    _check(t.eval_episodes >= 1, f"train.eval_episodes={t.eval_episodes} must be >= 1")
    _check(t.checkpoint_every >= 0, f"train.checkpoint_every={t.checkpoint_every} must be >= 0 (0 = only at the end)")
    _check(t.total_steps % t.log_every == 0,
           f"train.total_steps={t.total_steps} must be a multiple of train.log_every={t.log_every}")
    period = t.eval_every or t.log_every
    _check(period % t.log_every == 0 and t.total_steps % period == 0,
           f"train.eval_every={t.eval_every} must be a multiple of train.log_every={t.log_every} "
           f"that divides train.total_steps={t.total_steps}")
    _check(t.checkpoint_every % period == 0,
           f"train.checkpoint_every={t.checkpoint_every} must be a multiple of the evaluation period "
           f"({period} env steps)")
    _check(e.backend in BACKENDS, f"env.backend={e.backend!r} is not one of {', '.join(BACKENDS)}")
    _check(e.num_envs >= 1, f"env.num_envs={e.num_envs} must be >= 1")
    if t.tensorboard:
        import importlib.util

        _check(importlib.util.find_spec("tensorboardX") is not None,
               'train.tensorboard=true needs tensorboardX: pip install "rlstop[tensorboard]"')
    cfg.agent.validate(cfg)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: RunConfig, overrides: dict) -> RunConfig:
    """A new validated config with dotted-key overrides applied, e.g. {"agent.double_q": True}."""
    nested: dict = {}
    for k, v in overrides.items():
        node = nested
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return build_config(_deep_merge(to_dict(cfg), nested))


def traced_fields(agent_cfg) -> tuple[str, ...]:
    return type(agent_cfg).TRACED


def static_signature(cfg: RunConfig) -> str:
    """Everything that changes the compiled train function: the config minus traced values, names and seeds."""
    d = to_dict(cfg)
    for k in traced_fields(cfg.agent):
        d["agent"].pop(k, None)
    d.pop("name")
    d["train"].pop("seed")
    d["train"].pop("seeds")
    d["train"].pop("tensorboard")
    d["train"].pop("checkpoint_every")
    return yaml.safe_dump(d, sort_keys=True)
