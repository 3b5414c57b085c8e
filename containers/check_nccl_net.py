"""Build-time check of the GPU image: NCCL's network plugin for EFA (aws-ofi-nccl) loads.

    python check_nccl_net.py [--dir DIR ...]

Looks for the plugin library (libnccl-net-ofi.so, or the libnccl-net.so name NCCL loads by default) in the
given folders and then in LD_LIBRARY_PATH, loads it with the dynamic loader exactly as NCCL does (so a
missing libfabric or CUDA dependency fails here, at build time, not as a silent fall-back to TCP sockets
between nodes at run time), and checks that it exports a NCCL network plugin interface
(``ncclNetPlugin_v<N>``). Prints one line; exits 1 when the plugin is missing or does not load.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

PLUGIN_NAMES = ("libnccl-net-ofi.so", "libnccl-net.so")
# NCCL looks up the newest interface it knows first; aws-ofi-nccl exports several versions.
INTERFACE_VERSIONS = range(10, 1, -1)


def find_plugin(dirs: list[str]) -> Path | None:
    search = [*dirs, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep))]
    for folder in search:
        for name in PLUGIN_NAMES:
            candidate = Path(folder) / name
            if candidate.exists():
                return candidate
    return None


def check(dirs: list[str]) -> tuple[bool, str]:
    plugin = find_plugin(dirs)
    if plugin is None:
        where = ", ".join(dirs) or "(none given)"
        return False, f"no NCCL network plugin ({' or '.join(PLUGIN_NAMES)}) in {where} or LD_LIBRARY_PATH"
    try:
        library = ctypes.CDLL(str(plugin))
    except OSError as exc:
        return False, f"{plugin}: does not load ({exc}); a dependency (libfabric, CUDA) is missing"
    versions = [v for v in INTERFACE_VERSIONS if hasattr(library, f"ncclNetPlugin_v{v}")]
    if not versions:
        return False, f"{plugin}: loads but exports no ncclNetPlugin_v<N> symbol; it is not a NCCL net plugin"
    return True, f"{plugin}: NCCL net plugin loads (interfaces v{', v'.join(map(str, versions))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", action="append", default=[], help="A folder to search first.")
    args = parser.parse_args(argv)
    ok, line = check(args.dir)
    print(f"check_nccl_net: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
