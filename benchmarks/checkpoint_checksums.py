"""What the checksums recorded at every checkpoint commit cost: the save of a checkpoint-sized folder with
``torch.save`` (fsynced) against ``trnft.common.pipeline.checkpoints.write_checksums`` over it, and the
verification a resume does.

    python benchmarks/checkpoint_checksums.py [--mb 512] [--files 4] [--workdir DIR]

Prints the three times and the checksum's share of the save. The checksum reads every byte once more
(from the page cache right after a save; from the volume at resume).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from trnft.common.pipeline import checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="Checkpoint size in MB.")
    parser.add_argument("--files", type=int, default=4, help="Files it is split into.")
    parser.add_argument("--workdir", default=None, help="Where to write (default: a temporary folder).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "checkpoint-1"
        folder.mkdir()
        per_file = args.mb * (1 << 20) // args.files // 4
        tensors = [torch.randn(per_file) for _ in range(args.files)]
        start = time.perf_counter()
        for i, tensor in enumerate(tensors):
            path = folder / f"shard-{i}.pt"
            torch.save({"w": tensor}, path)
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        checkpoints.write_checksums(folder)
        checksum_s = time.perf_counter() - start
        start = time.perf_counter()
        assert checkpoints._checksum_problem(folder) == ""
        verify_s = time.perf_counter() - start
    size = args.mb
    print(f"checkpoint of {size} MB in {args.files} files")
    print(f"  save (torch.save + fsync): {save_s:.2f} s ({size / save_s:.0f} MB/s)")
    print(
        f"  checksums at commit:       {checksum_s:.2f} s ({size / checksum_s:.0f} MB/s), {checksum_s / save_s:.0%} of the save"
    )
    print(f"  verification at resume:    {verify_s:.2f} s ({size / verify_s:.0f} MB/s)")


if __name__ == "__main__":
    main()
