"""The trial run that ``neuron_parallel_compile`` wraps: ``python -m trnft.neuron.precompile --config FILE``.

The compile stage starts this module under torchrun with the train job's layout, environment and
compiler flags (:func:`trnft.neuron.compile.parallel_compile_command`). It builds the model, optimizer and
data exactly as the train stage does (:func:`trnft.neuron.trainium.precompile`) and runs
``train.compile_steps`` steps, so ``neuron_parallel_compile`` extracts and compiles the graphs training
will ask for. It writes no checkpoint and no stage output.

This is its own entry point, not ``trnft train`` in a special environment: the train stage refuses to
run under ``neuron_parallel_compile`` (:func:`trnft.neuron.train.run`), where model outputs are not real.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..common.config.run_config import load_config
from ..common.env import set_process_defaults
from ..common.exits import run_command

MODULE = "trnft.neuron.precompile"


def main(argv: Sequence[str] | None = None) -> int:
    set_process_defaults()
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="The train stage's first steps, for neuron_parallel_compile to extract their graphs.",
    )
    parser.add_argument("--config", action="append", required=True, metavar="FILE", help="Run config YAML.")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="Config overrides.")
    parser.add_argument("--debug", action="store_true", help="Print the traceback of an error.")
    args = parser.parse_args(argv)

    def work() -> int:
        from . import trainium

        trainium.precompile(load_config(args.config, args.overrides), lambda m: print(m, flush=True))
        return 0

    return run_command("compile", work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
