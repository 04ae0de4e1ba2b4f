"""Run directories: write atomically, read back, know what is finished.

Layout (DESIGN.md): ``OUT/<run>/config.yaml``, ``metrics.csv`` (one row per seed and logging
point), ``summary.json``, ``checkpoints/``. A run is finished when its summary.json exists: it is
written last, and every file is written to a temporary name and renamed, so a killed process
never leaves a file that looks complete.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd

from rlstop.errors import UserError

VERSION_PACKAGES = ("rlstop", "jax", "jaxlib", "flax", "optax", "gymnax", "gymnasium", "numpy")


def versions() -> dict:
    out = {}
    for p in VERSION_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: str, obj: dict) -> None:
    atomic_write(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}); delete it or rerun") from None


def write_metrics(path: str, df: pd.DataFrame) -> None:
    atomic_write(path, df.to_csv(index=False, float_format="%.6g", na_rep=""))


def is_complete(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "summary.json"))


def load_run(run_dir: str) -> tuple[dict, pd.DataFrame]:
    """(summary, metrics) of a finished run; a clear error when the folder is not one."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir!r} not found; give a folder written by `rlstop train`")
    if not is_complete(run_dir):
        raise UserError(f"{run_dir} has no summary.json: the run did not finish; rerun its command to resume it")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    if "status" not in summary or "name" not in summary:
        raise UserError(f"{run_dir}/summary.json was not written by this version of rlstop; rerun the run")
    try:
        df = pd.read_csv(os.path.join(run_dir, "metrics.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        raise UserError(f"{run_dir}/metrics.csv is missing or empty; rerun the run") from None
    return summary, df
