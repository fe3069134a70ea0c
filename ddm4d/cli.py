"""`ddm4d` command line: train | generate | evaluate | phantom.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported only when their command runs, so `ddm4d phantom` never pays for torch start-up
of the others. User mistakes (:class:`ddm4d.errors.InputError`) exit with code 2 and one line.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

from .errors import InputError

COMMANDS = {
    "train": ("ddm4d.training", "train a DDM on an ACDC-layout folder or a pairs CSV"),
    "generate": ("ddm4d.generation", "generate intermediate frames between a source and a target volume"),
    "evaluate": ("ddm4d.evaluation", "evaluate DDM and baselines on ACDC-layout data (Table 1)"),
    "phantom": ("ddm4d.phantom", "write a synthetic 4D cardiac data set in the ACDC layout"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """argparse itself answers bad options with exit code 2 and one error line."""
    parser = argparse.ArgumentParser(prog="ddm4d", description=__doc__.splitlines()[0])
    requested = next((a for a in argv if not a.startswith("-")), None)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ddm4d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # argument definitions are cheap; import the module lazily only for the chosen command
        if name == requested:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # idle OpenMP threads sleep instead of spinning: on a small busy machine spinning threads made a
    # training step many times slower (measured); set before torch is imported by the command
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .allocator import tune_cpu_allocator

    tune_cpu_allocator()  # this process is ours: keep freed tensor memory for reuse (see allocator.py)
    whole_process = argv is None  # the console script or `python -m ddm4d`, not a caller's own process
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(args._module)
    if whole_process:
        # what the imports made (with torch some 180,000 objects) lives as long as the process: the
        # cyclic garbage collector need not walk it at every full collection (0.1 s each) and at exit
        # (0.5-0.7 s measured, of a 5 s `ddm4d generate`)
        gc.freeze()
    try:
        code = int(module.main(args) or 0)
    except InputError as err:
        print(f"ddm4d {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"ddm4d {args.command}: interrupted", file=sys.stderr)
        code = 130
    if whole_process and args.command == "train":
        end_distributed_worker(code)
    return code


def end_distributed_worker(code: int) -> None:
    """In a torchrun training job (WORLD_SIZE > 1), end the process here, output flushed, without the
    interpreter's shutdown. Why: the process group's worker threads outlive destroy_process_group while
    DDP has used it, and one still releasing a finished all-reduce when Python shuts down cannot take
    the GIL and aborts the process (SIGABRT after a finished run: 4 of 50 two-process runs). Everything
    of the run is written and closed by then (ddm4d.training.cli's session)."""
    from .training.distributed import Dist  # torch is loaded by then: train has run

    if Dist.from_env().world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
