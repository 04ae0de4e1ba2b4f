"""The ``rlstop`` command: train | sweep | ablate | compare | eval | list.

Exit status: 0 on success; 2 on bad input, with one ``error:`` line on stderr and nothing
written; 1 on an internal failure.
"""
from __future__ import annotations

import argparse
import os
import sys

from rlstop.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors follow the one-line contract too
        raise UserError(f"{message}; see `rlstop {self.prog.split()[-1]} --help`" if " " in self.prog
                        else f"{message}; see `rlstop --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlstop", description="RL in JAX where every stop-gradient is a switch.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("train", help="train one config (all its seeds at once)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. agent.double_q=true")
    t.add_argument("--out", default="runs", help="output folder (default: runs/)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("sweep", help="train a grid of configs, batching runs that share a compile")
    s.add_argument("sweep")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--out", default="runs")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--jobs", type=int, default=1, help="static groups trained side by side (processes)")

    a = sub.add_parser("ablate", help="every switch of the agent off, one at a time, plus all off, x seeds")
    a.add_argument("config")
    a.add_argument("overrides", nargs="*")
    a.add_argument("--out", default="runs")
    a.add_argument("--quiet", action="store_true")
    a.add_argument("--no-compare", action="store_true", help="skip the figures and tables")

    c = sub.add_parser("compare", help="figures and tables comparing runs or sweeps")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--metric", default=None, help="plot only this metric (default: all)")
    c.add_argument("--out", default=None, help="PNG file for --metric, or a folder (default: the first DIR)")

    e = sub.add_parser("eval", help="greedy evaluation of a finished run")
    e.add_argument("run_dir")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--gif", default=None)

    sub.add_parser("list", help="agents, envs, configs and switches")
    return p


def _check_run_dir(out_root: str, name: str, cfg) -> bool:
    """True when an identical finished run exists (nothing to do); error when a different one does."""
    from rlstop import config as config_lib
    from rlstop import results

    run_dir = os.path.join(out_root, name)
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            if f.read() != config_lib.to_yaml(cfg):
                raise UserError(f"{run_dir} holds a run with a different config; choose another --out or name=<new name>")
        return results.is_complete(run_dir)
    return False


def _check_writable(out_root: str) -> None:
    probe = out_root
    while not os.path.exists(probe):
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to {out_root!r}; choose a writable folder with --out")


def cmd_train(args) -> int:
    from rlstop import config as config_lib
    from rlstop import sweep
    from rlstop.train import parallel

    parallel.maybe_initialize()
    cfg = config_lib.load_config(args.config, args.overrides)
    _check_writable(args.out)
    if _check_run_dir(args.out, cfg.name, cfg):
        print(f"{os.path.join(args.out, cfg.name)} is already finished; nothing to do")
        return 0
    sweep.execute([sweep.Run(cfg.name, cfg, {})], args.out, None, show_progress=not args.quiet)
    return 0


def cmd_sweep(args) -> int:
    from rlstop import sweep
    from rlstop.train import parallel

    parallel.maybe_initialize()
    name, runs = sweep.load_sweep(args.sweep, args.overrides)
    if args.jobs < 1:
        raise UserError(f"--jobs={args.jobs} must be >= 1")
    _check_writable(args.out)
    sweep.execute(runs, args.out, name, show_progress=not args.quiet, jobs=args.jobs)
    return 0


def cmd_ablate(args) -> int:
    from rlstop import config as config_lib
    from rlstop import sweep

    from rlstop.train import parallel

    parallel.maybe_initialize()
    cfg = config_lib.load_config(args.config, args.overrides)
    _check_writable(args.out)
    runs = sweep.ablation_runs(cfg)
    name = f"{cfg.name}_ablate"
    sweep.execute(runs, args.out, name, show_progress=not args.quiet)
    if not args.no_compare and parallel.is_main_process():
        from rlstop import analysis

        analysis.compare([os.path.join(args.out, name)], out=None, metric=None, log=print)
    return 0


def cmd_compare(args) -> int:
    from rlstop import analysis

    analysis.compare(args.dirs, out=args.out, metric=args.metric, log=print)
    return 0


def cmd_eval(args) -> int:
    from rlstop import evaluate

    evaluate.main(args.run_dir, args.episodes, args.gif)
    return 0


def cmd_list(args) -> int:
    from rlstop import catalog

    print(catalog.describe())
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "ablate": cmd_ablate, "compare": cmd_compare,
            "eval": cmd_eval, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = _parser().parse_known_args(argv)
        # key=value overrides may also come after the flags
        if extra:
            bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
            if bad:
                raise UserError(f"unrecognized argument {bad[0]!r}; see `rlstop {args.command or ''} --help`".replace(" ''", ""))
            args.overrides = list(args.overrides) + extra
        if args.command is None:
            _parser().print_help()
            return 2
        if args.command in ("train", "sweep", "ablate", "eval"):
            from rlstop.train import runtime

            runtime.configure()  # before anything starts JAX's backend: it reads these once
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable or full output folder, a vanished file
        where = f" {e.filename!r}" if e.filename else ""
        print(f"error: cannot read or write{where}: {e.strerror or e}; check the path, its permissions and free "
              "space (finished runs are kept; rerun the same command to resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
