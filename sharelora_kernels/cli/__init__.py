"""Command-line subcommands of ``python -m sharelora_kernels``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``;
``sharelora_kernels.__main__.COMMANDS`` maps subcommand names to modules. A ``CommandError`` raised
by ``run`` is printed as a one-line error (no traceback) with exit status 2.
"""


class CommandError(Exception):
    """A user-facing error of a subcommand: bad path, bad file, a model that does not fit."""
