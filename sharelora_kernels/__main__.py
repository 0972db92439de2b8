"""``python -m sharelora_kernels <command>``: plan, finetune, compare, bench, gpu-check (see ``sharelora_kernels.cli``).

Parsing imports only the command modules' option definitions (no torch), so ``--help`` and every
option error answer at once; a command imports what it needs once its options are checked.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

# Subcommand name -> module defining HELP, add_arguments(parser) and run(args). Add a command here.
COMMANDS = {
    "plan": "sharelora_kernels.cli.plan",
    "finetune": "sharelora_kernels.cli.finetune",
    "compare": "sharelora_kernels.cli.compare",
    "bench": "sharelora_kernels.benchmarks",
    "gpu-check": "sharelora_kernels.cli.gpu_check",
}


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv``; returns its exit status. None: the process's own command line
    (``python -m sharelora_kernels``, ``sharelora``), after which the process ends: Ctrl-C is then
    ignored from the moment the command is done, so one arriving while the interpreter shuts down
    (torch's exit callbacks) prints no traceback and does not turn a finished run into a kill."""
    with _CtrlC(last=argv is None) as ctrl_c:
        try:
            return _main(argv)
        except KeyboardInterrupt:  # before a command's own handling: while its modules are imported
            pass
        except Exception:
            if not ctrl_c.pressed:
                raise
            # A library swallowed the KeyboardInterrupt and failed later because of it (transformers'
            # lazy imports report a half-imported module as missing): the Ctrl-C is what happened.
    print("sharelora_kernels: interrupted", file=sys.stderr)
    return 130


class _CtrlC:
    """Within ``with``: Ctrl-C (SIGINT) raises KeyboardInterrupt as Python's default handler does,
    and ``pressed`` records that it came. Installed only over the default handler, in the main thread;
    the ``with`` ends by putting the default back, or for ``last`` (nothing of the process's own
    remains to be stopped) by ignoring SIGINT."""

    def __init__(self, last: bool = False):
        self.pressed = False
        self._installed = False
        self._last = last

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread() and (
                signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.SIG_IGN if self._last else signal.default_int_handler)

    def _on_sigint(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt


def _main(argv: list[str] | None) -> int:
    from .cli import CommandError
    from .cli.parser import HelpFormatter, Parser, did_you_mean

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "sharelora" if os.path.basename(sys.argv[0]) == "sharelora" else "python -m sharelora_kernels"
    parser = Parser(prog=prog, description="Shared low-rank adapters: plan share sets, fine-tune, compare, export.")
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}; commands: {', '.join(COMMANDS)}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run, command_parser=p)
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except CommandError as err:
        kind = "error: " if err.exit_code == 2 else ""
        print(f"{parser.prog} {args.command}: {kind}{err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) and not isinstance(status, bool) else 0  # a command may return its exit status


if __name__ == "__main__":
    sys.exit(main())
