"""Checkpoints of a training batch with orbax: the whole state (agents, optimizers, replay
buffers, env states, RNG keys) plus the metrics logged so far, so a killed run continues where
it stopped and ends with the same curves as an uninterrupted one."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np

from rlstop import config as config_lib


def _fingerprint(cfgs) -> str:
    """The configs a checkpoint belongs to (all of them, seeds and names included)."""
    text = "\n---\n".join(config_lib.to_yaml(c) for c in cfgs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _abstract(tree):
    """Shapes, dtypes and (for arrays laid out over devices) shardings to restore into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def _manager(directory: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True),
    )


class GroupCheckpoint:
    """The latest checkpoint of one group, in ``directory``; ignored if written for other configs."""

    def __init__(self, directory: str, cfgs):
        self.dir = directory
        self.fingerprint = _fingerprint(cfgs)

    def _meta_path(self, step: int) -> str:
        return os.path.join(self.dir, f"log-{step}.npz")

    def save(self, step: int, runner, rows: list, evals: list, next_chunk: int) -> None:
        import orbax.checkpoint as ocp

        from rlstop.results import atomic_write

        os.makedirs(self.dir, exist_ok=True)
        mngr = _manager(self.dir)
        mngr.save(step, args=ocp.args.StandardSave(runner), force=True)
        mngr.wait_until_finished()
        # The metrics so far, then the marker that makes the checkpoint count (written last).
        log = {f"row{i}__{k}": v for i, r in enumerate(rows) for k, v in r.items()}
        log.update({f"eval{i}": e for i, e in enumerate(evals)})
        tmp = self._meta_path(step) + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **log)
        os.replace(tmp, self._meta_path(step))
        atomic_write(os.path.join(self.dir, "resume.json"),
                     json.dumps({"fingerprint": self.fingerprint, "step": step, "next_chunk": next_chunk,
                                 "rows": len(rows)}))
        for name in os.listdir(self.dir):  # older logs
            if name.startswith("log-") and name != os.path.basename(self._meta_path(step)):
                os.unlink(os.path.join(self.dir, name))

    def restore(self, like):
        """(runner, rows, evals, next_chunk) from the latest checkpoint, or None."""
        import orbax.checkpoint as ocp

        marker = os.path.join(self.dir, "resume.json")
        if not os.path.isfile(marker):
            return None
        with open(marker) as f:
            meta = json.load(f)
        if meta.get("fingerprint") != self.fingerprint or not os.path.isfile(self._meta_path(meta["step"])):
            return None
        mngr = _manager(self.dir)
        if mngr.latest_step() != meta["step"]:
            return None
        runner = mngr.restore(meta["step"], args=ocp.args.StandardRestore(_abstract(like)))
        with np.load(self._meta_path(meta["step"])) as z:
            rows = [{} for _ in range(meta["rows"])]
            evals = [None] * meta["rows"]
            for key in z.files:
                if key.startswith("row"):
                    i, k = key[3:].split("__", 1)
                    rows[int(i)][k] = z[key]
                else:
                    evals[int(key[4:])] = z[key]
        return runner, rows, evals, meta["next_chunk"]

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def save_final(directory: str, runner) -> None:
    """The final state of one run (its seeds), for `rlstop eval` and for initialising other runs."""
    import orbax.checkpoint as ocp

    mngr = _manager(directory)
    mngr.save(0, args=ocp.args.StandardSave(runner), force=True)
    mngr.wait_until_finished()


def load_final(directory: str, like):
    import orbax.checkpoint as ocp

    mngr = _manager(directory)
    step = mngr.latest_step()
    if step is None:
        return None
    return mngr.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
