"""The installed package is the source tree: a non-editable install (the images, the GPU check) ships every
file of the package folders.

The images install trnft with ``pip install --no-deps SOURCE``, not editable, so a file left out of the
package data would be missing only there, where no local test looks.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

from helpers import REPO

PACKAGE_DIRS = {
    "common": "trnft/common",
    "neuron": "trnft/neuron",
    "gpu": "trnft/gpu",
    "jobspecs": "trnft/jobspecs",
    "examples": "trnft/examples",
}


def test_the_wheel_holds_every_file_of_the_package_folders(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("trnft-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    tracked = [
        path.relative_to(REPO).as_posix()
        for folder in PACKAGE_DIRS
        for path in sorted((REPO / folder).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    assert "examples/data/tiny_instructions.jsonl" in tracked
    missing = [
        path
        for path in tracked
        if PACKAGE_DIRS[path.split("/")[0]] + path[len(path.split("/")[0]) :] not in shipped
    ]
    assert missing == []
