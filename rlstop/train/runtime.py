"""Process-wide JAX settings every entry point applies before anything compiles or runs.

1. Synchronous dispatch on CPU (``jax_cpu_enable_async_dispatch=False``): a computation runs in
   the calling thread instead of being handed to the CPU client's dispatch thread. The host loop
   makes one small call per env step and waits for it; handing each over to another thread and
   back costs more than the call on a busy 2-core machine (a one-env DQN on gymnasium: ~125 us
   per env step synchronous, ~205 us asynchronous). The scan loop waits for every chunk's metrics
   anyway, so it does not notice. JAX reads this when its CPU backend starts, so it must be set
   before the first computation (or anything that starts the backend, e.g. ``jax.devices()``).

2. Fewer garbage collections. Tracing and lowering a program allocate millions
   of short-lived Python objects, and CPython's default thresholds then run a collection every
   700 allocations, each young one cheap but every tenth or hundredth walking the older objects
   too -- by then the whole of jax, flax and optax. ``gc.freeze()`` puts everything that exists
   (the imported libraries) out of the collector's reach for good, and a young generation of
   50,000 objects makes collections rarer. Measured on CartPole DQN, 2 cores: the first compile
   ~0.6 s faster (4.2-4.6 s instead of 4.7-5.2 s), and JAX's import ~1 s faster when this runs
   first (the CLI calls it before importing anything else). Garbage is still collected, in
   bigger steps.

3. One CPU device per core (``jax_num_cpu_devices``). The driver splits a batch of runs x seeds
   over the devices (``rlstop.train.parallel``), and each device runs its slice on one core. The
   networks here are small, and XLA's intra-op threads cost more on them than they give: a
   16-seed PPO CartPole run takes ~2.2 s per 32k env steps on 2 cores as two devices, ~4.8 s as
   one device using both cores. A batch of one (a single seed) stays on one device.
   ``$RLSTOP_CPU_DEVICES`` sets the count (``1``: one device, as JAX's default); an
   ``--xla_force_host_platform_device_count`` in ``$XLA_FLAGS`` wins. Like (1), JAX reads it when
   its backend starts: in a process where JAX has already computed something, the count it
   started with stays.

4. LLVM at -O2 for the compiled loop (``xla_backend_optimization_level=2``; XLA's default is 3).
   XLA CPU spends most of a compile in LLVM, and on these programs -O3's extra passes buy no
   speed. CartPole, first compiles of one seed (medians of 5, interleaved with -O3): DQN 3.14 ->
   2.97 s, PPO 4.59 -> 4.17 s; run times (medians of 4) DQN 7.60 -> 7.78 s, PPO 3.90 -> 3.87 s;
   16 seeds (one run each): compile DQN 5.31 -> 4.74 s, PPO 8.08 -> 6.10 s, run DQN 36.6 ->
   37.1 s, PPO 43.2 -> 34.3 s. Results differ from -O3's in float rounding.

   Also without XLA CPU's tiled emitter (``xla_cpu_disable_tiled_emitter``): transposes are
   emitted by the ordinary loop emitter, which compiles faster and computes the same values, bit
   for bit (2-seed DQN, PPO and Pendulum runs). First compiles of one CartPole seed (medians of 6,
   interleaved): DQN 2.99 -> 2.63 s, PPO 4.21 -> 3.96 s; run times within this machine's noise
   (one PPO seed, medians of 8: 4.0 and 4.1 s; 16 seeds: DQN 36.6 and 37.2 s, PPO 35.5 and
   35.7 s).

   And without XLA CPU's loop unrolling (``xla_cpu_disable_loop_unrolling``): less code for LLVM
   to optimise. One CartPole seed, interleaved, with the evaluation compiled apart: PPO compile
   medians 3.33 -> 3.02 s (six each) and run 4.27 -> 4.29 s; DQN compile 2.24 -> 2.24 s, run
   6.82 -> 6.78 s (four each). Results differ in float rounding.

   Both are backend options, which XLA takes only from ``$XLA_FLAGS``
   (``--xla_backend_extra_options``) and reads at the process's first compile: ``configure``
   adds them there unless ``$XLA_FLAGS`` already gives backend options (the user's own win), and
   in a process that compiled something before ``configure`` they have no effect. Other backends
   ignore them (XLA hands LLVM only the backend options whose names do not start with ``xla_``).

   ``$RLSTOP_FAST_COMPILE=1``: the scan loop's chunk function also compiles with XLA CPU's older
   fusion emitters (``xla_cpu_use_fusion_emitters=false``; the init function always does, see
   ``rlstop.train.driver``). Off by default: compiles are ~30% shorter, but the code they give
   can be slower. One-seed CartPole DQN: compile 3.2 -> 2.3 s, run 6.8 -> 7.7 s (metrics bit-identical);
   one-seed PPO: compile 4.7 -> 3.3 s, run about twice as long (metrics differ in float rounding).
   For short runs and quick checks.

5. JAX's persistent compilation cache, on by default.

A run's compiled functions depend only on its static signature (shapes, the agent's static
options, which hyper-parameters vary across the batch), so the second run of a config -- a rerun,
another seed count's sibling in a sweep, the same ablation next day -- finds its executables on
disk instead of compiling them again (about 5 s -> 0.3 s for CartPole DQN on 2 cores).

Where: ``$RLSTOP_COMPILATION_CACHE`` if set (``off`` disables it), else ``$JAX_COMPILATION_CACHE_DIR``
(JAX's own setting wins when given), else ``$XDG_CACHE_HOME/rlstop/jax`` (``~/.cache/rlstop/jax``).
Entries are keyed by JAX on the program, the jax/jaxlib versions and the backend, so a stale
entry is never used. The folder is not pruned (an entry is 0.1-1 MB); delete it at any time.
"""
from __future__ import annotations

import gc
import os

from rlstop.errors import UserError

ENV = "RLSTOP_COMPILATION_CACHE"
DEVICES_ENV = "RLSTOP_CPU_DEVICES"
FAST_COMPILE_ENV = "RLSTOP_FAST_COMPILE"
# XLA compile options, by platform: always (4), with fast compiles, and in one piece.
DEFAULT_OPTIONS = {"cpu": {"xla_backend_optimization_level": 2}}
OLDER_EMITTERS = {"cpu": {"xla_cpu_use_fusion_emitters": False}}
ONE_PIECE = {"cpu": {"xla_cpu_parallel_codegen_split_count": 1}}  # LLVM code in one piece, on one thread
# XLA backend options (4), which XLA reads from $XLA_FLAGS only.
BACKEND_OPTIONS = "xla_cpu_disable_tiled_emitter=true,xla_cpu_disable_loop_unrolling=true"
OFF = {"off", "0", "false", "no", "none"}

_state = {"dir": None, "configured": False, "hits": 0, "misses": 0}


def _count(event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
        _state["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        _state["misses"] += 1


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rlstop", "jax")


def cpu_devices() -> int:
    """The CPU device count to ask for: ``$RLSTOP_CPU_DEVICES``, else the cores this process may use."""
    setting = os.environ.get(DEVICES_ENV, "").strip()
    if setting:
        try:
            n = int(setting)
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"{DEVICES_ENV}={setting!r} must be a positive integer (the number of CPU devices; "
                            f"1 runs everything on one)")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def _set_cpu_devices(jax) -> None:
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    n = cpu_devices()
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend already started (JAX computed something first): keep its count
        pass


def _set_backend_options() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_extra_options" in flags:  # the user's own backend options win
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_extra_options={BACKEND_OPTIONS}".strip()


def configure() -> str | None:
    """Apply these settings to this process (idempotent); return the cache folder, or None when
    the cache is off or its folder cannot be created (a run then simply compiles)."""
    if _state["configured"]:
        return _state["dir"]
    _state["configured"] = True
    gc.set_threshold(50_000, 50, 100)  # first: the imports below allocate too
    _set_backend_options()  # before anything compiles: XLA reads $XLA_FLAGS once
    import jax
    from jax import monitoring

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _set_cpu_devices(jax)
    gc.freeze()
    setting = os.environ.get(ENV)
    if setting is not None and setting.strip().lower() in OFF:
        return None
    path = setting or jax.config.jax_compilation_cache_dir or default_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Small executables too (an init function compiles in well under JAX's default 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    monitoring.register_event_listener(_count)
    _state["dir"] = path
    return path


def compiler_options(platform: str, *, always_fast: bool = False, one_piece: bool = False) -> dict | None:
    """XLA options for compiling a function for ``platform`` (None: XLA's defaults): LLVM at -O2 on
    CPU, plus the older CPU fusion emitters when ``always_fast`` (a function that runs once) or
    ``$RLSTOP_FAST_COMPILE`` is on, and with ``one_piece`` the CPU code generated in one piece on
    one thread rather than split over XLA's codegen pool (a compile that overlaps other work)."""
    fast = always_fast or os.environ.get(FAST_COMPILE_ENV, "").strip().lower() not in ("", *OFF)
    options = {**DEFAULT_OPTIONS.get(platform, {}), **(OLDER_EMITTERS.get(platform, {}) if fast else {}),
               **(ONE_PIECE.get(platform, {}) if one_piece else {})}
    return options or None


def counts() -> dict:
    """Executables loaded from the cache and compiled afresh in this process so far."""
    return {"hits": _state["hits"], "misses": _state["misses"]}
