"""Command-line subcommands of ``python -m sharelora_kernels``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``;
``sharelora_kernels.__main__.COMMANDS`` maps subcommand names to modules. ``run`` checks every option,
the model directory's kind and the output folder before it loads a model (``loading`` and
``outputs``), so a bad command line fails in seconds. A ``CommandError`` raised by ``run`` is printed
as a one-line error (no traceback) with its ``exit_code`` (2, argparse's status for usage errors;
130 for ``Interrupted``, a shell's status for Ctrl-C).
"""
import math


class CommandError(Exception):
    """A user-facing error of a subcommand: bad option, path or file, a model that does not fit."""

    exit_code = 2


class Interrupted(CommandError):
    """Ctrl-C stopped the command after it saved what it had finished (the message says what and where)."""

    exit_code = 130


class Diverged(CommandError):
    """A training loss became NaN or infinite: that run's adapters are not written."""

    exit_code = 1


def require_positive(args, *names: str) -> None:
    """CommandError naming the first option among ``names`` (argparse dests, e.g. "batch_size")
    that was given (not None) and is not a finite number > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise CommandError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def require_between(args, name: str, low: float, high: float = math.inf) -> None:
    """CommandError naming option ``name`` (an argparse dest) unless low <= its value <= high (NaN fails)."""
    value = getattr(args, name)
    if not low <= value <= high:
        bound = f"in [{low}, {high}]" if high < math.inf else f">= {low}"
        raise CommandError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def check_settings() -> None:
    """CommandError for a bad SHARELORA_BACKEND / SHARELORA_AUTOTUNE, for a command to name before it
    times anything (the package keeps a bad value until a call needs it). Imports torch: call it after
    the options are checked, which answer at once."""
    import torch

    from ..ops import dispatch

    try:
        dispatch.backend_setting(torch.device("cpu"))
        dispatch.autotune_mode()
    except ValueError as err:
        raise CommandError(str(err)) from None


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun`` in the right number: "1 set", "3 sets" (plural by adding "s")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def per_type(values: dict[str, int]) -> str:
    """A per-module-type number: "16" when every type has it, else "q_proj 16, v_proj 12"."""
    if len(set(values.values())) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{t} {v}" for t, v in values.items())
