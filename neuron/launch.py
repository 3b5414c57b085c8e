"""The Neuron environment of the compile and train processes: compiler flags, the shared compile cache.

The torchrun command itself is platform-neutral (:func:`trnft.common.cluster.launch.torchrun_argv`); the
compile stage wraps the same torchrun layout in ``neuron_parallel_compile`` with this environment, running
the train stage's first ``train.compile_steps`` steps (:mod:`trnft.neuron.precompile`), so the compile
cache is filled with exactly the graphs training will ask for.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from ..common.cluster.instances import InstanceType, Layout
from ..common.config.run_config import NEURON_CACHE_DIR_CHARS, RunConfig
from ..common.errors import ConfigError


def cache_dir(cfg: RunConfig) -> str:
    """The compile cache shared by compile and train: ``neuron.cache_dir`` or ``<run.root>/neuron_cache``.

    Raises:
        ConfigError: the path is relative or has characters optimum-neuron would cut it at (such as '.').
    """
    path = cfg.neuron.cache_dir or f"{cfg.run.root}/neuron_cache"
    key = "neuron.cache_dir" if cfg.neuron.cache_dir else "neuron.cache_dir (default <run.root>/neuron_cache)"
    if not PurePosixPath(path).is_absolute():
        raise ConfigError(f"{key}: must be an absolute path, got {path!r}")
    bad = sorted(set(path) - NEURON_CACHE_DIR_CHARS)
    if bad:
        raise ConfigError(
            f"{key}: {path!r} contains {''.join(bad)!r}; optimum-neuron cuts --cache_dir at such characters, "
            "so compile and train would use different caches. Use letters, digits, '_', '-' and '/' only"
        )
    return path


def neuron_cc_flags(cfg: RunConfig, inst: InstanceType) -> str:
    """NEURON_CC_FLAGS: the configured compiler flags, the instance's target, LNC on trn2, the cache."""
    flags = [*cfg.neuron.compiler_flags, f"--target={inst.target}"]
    if inst.target == "trn2":
        flags.append(f"--logical-nc-config={cfg.neuron.logical_nc_config}")
    flags.append(f"--cache_dir={cache_dir(cfg)}")
    return " ".join(flags)


def neuron_env(cfg: RunConfig, inst: InstanceType, layout: Layout) -> dict[str, str]:
    """Environment of the Neuron train/compile processes (the same for both, so graphs hash the same)."""
    env = {
        "NEURON_RT_NUM_CORES": str(layout.nproc_per_node),
        "NEURON_CC_FLAGS": neuron_cc_flags(cfg, inst),
        # glibc arenas grow host memory per thread; optimum-neuron caps them too (host OOM at save time).
        "MALLOC_ARENA_MAX": "64",
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "3",
    }
    if inst.target == "trn2":
        env["NEURON_LOGICAL_NC_CONFIG"] = str(cfg.neuron.logical_nc_config)
    return env
