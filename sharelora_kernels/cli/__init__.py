"""Command-line subcommands of ``python -m sharelora_kernels``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``;
``sharelora_kernels.__main__.COMMANDS`` maps subcommand names to modules. A ``CommandError`` raised
by ``run`` is printed as a one-line error (no traceback) with exit status 2; ``run`` checks its
numeric options first with ``require_positive``, so a bad value fails before any model is loaded.
"""
import math


class CommandError(Exception):
    """A user-facing error of a subcommand: bad path, bad file, a model that does not fit."""


def require_positive(args, *names: str) -> None:
    """CommandError naming the first option among ``names`` (argparse dests, e.g. "batch_size")
    that was given (not None) and is not a finite number > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise CommandError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
