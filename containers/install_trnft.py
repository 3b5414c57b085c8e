"""Install trnft into a framework image without replacing the framework's own packages.

Reads trnft's dependencies from ``pyproject.toml``, leaves out the ``--keep`` packages (the base image
provides them) and ``--skip`` ones, pins every installed ``--keep`` package to its installed version as a
pip constraint, installs the rest plus ``--extra`` requirements, installs trnft itself without
dependencies, and fails if any ``--keep`` package changed version.

    python install_trnft.py --keep torch torch-xla --extra optimum-neuron==0.4.5 [--source DIR]

A dependency line's exact versions (containers/constraints/*.txt) come in two ways: ``--constraints FILE``
constrains pip with it (the current line: pyproject.toml's ranges, the file's versions); ``--at-versions-of
FILE`` installs each of trnft's dependencies, by name, at the version FILE pins instead of pyproject.toml's
specifier (the trn1 line, whose torch 2.8 / transformers 4.57.1 lie outside those ranges). Lines of FILE for
``--keep`` and ``--skip`` packages are left out: the base image's own versions win.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s<>=!~;\[@]", requirement.strip(), maxsplit=1)[0])


def installed_versions(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[canonical(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def plan(dependencies: list[str], keep: list[str], skip: list[str]) -> list[str]:
    """The dependencies pip should install: all but the kept and skipped ones."""
    drop = {canonical(n) for n in [*keep, *skip]}
    return [d for d in dependencies if requirement_name(d) not in drop]


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by canonical name (comments and blanks skipped)."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"install_trnft: {path}: {raw!r} is not name==version")
        pins[canonical(name)] = version.strip()
    return pins


def at_versions(dependencies: list[str], pins: dict[str, str], path: Path) -> list[str]:
    """Each dependency by name at the version ``pins`` has (extras kept); one missing is an error."""
    out = []
    for dep in dependencies:
        name = requirement_name(dep)
        if name not in pins:
            raise SystemExit(f"install_trnft: {path} pins no version of {name}; add it (pip freeze)")
        extras = re.match(r"[^\s<>=!~;\[@]+(\[[^\]]*\])?", dep.strip()).group(1) or ""
        out.append(f"{name}{extras}=={pins[name]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=".", help="trnft source folder (with pyproject.toml)")
    parser.add_argument(
        "--keep", nargs="*", default=[], help="packages the base image provides; never replaced"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="trnft dependencies not wanted in this image")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more requirements (e.g. optimum-neuron==0.4.5)"
    )
    parser.add_argument("--constraints", type=Path, help="a dependency line's versions, as pip constraints")
    parser.add_argument(
        "--at-versions-of", type=Path, help="install each dependency at the version this file pins"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands only")
    args = parser.parse_args(argv)

    source = Path(args.source).resolve()
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    before = installed_versions(args.keep)
    wanted = plan(project["dependencies"], args.keep, args.skip)
    if args.at_versions_of is not None:
        wanted = at_versions(wanted, read_pins(args.at_versions_of), args.at_versions_of)
    wanted += list(args.extra)
    line_pins = read_pins(args.constraints) if args.constraints is not None else {}
    base = {canonical(n) for n in [*args.keep, *args.skip]}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("".join(f"{name}=={version}\n" for name, version in before.items()))
        fh.write("".join(f"{name}=={version}\n" for name, version in line_pins.items() if name not in base))
        constraints = fh.name
    commands = [
        [sys.executable, "-m", "pip", "install", "--constraint", constraints, *wanted],
        [sys.executable, "-m", "pip", "install", "--no-deps", str(source)],
    ]
    for cmd in commands:
        print("+", " ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    if args.dry_run:
        return 0
    after = installed_versions(args.keep)
    changed = {
        n: (before.get(n), after.get(n)) for n in set(before) | set(after) if before.get(n) != after.get(n)
    }
    if changed:
        print(
            f"install_trnft: base packages changed: {changed}; fix the pins so the base image's stay",
            file=sys.stderr,
        )
        return 1
    print(f"install_trnft: kept {', '.join(f'{n} {v}' for n, v in sorted(before.items())) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
