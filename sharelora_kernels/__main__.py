"""``python -m sharelora_kernels <command>``: plan, finetune, compare, bench, gpu-check (see ``sharelora_kernels.cli``).

Parsing imports only the command modules' option definitions (no torch), so ``--help`` and every
option error answer at once; a command imports what it needs once its options are checked.
"""
from __future__ import annotations

import importlib
import os
import sys

# Subcommand name -> module defining HELP, add_arguments(parser) and run(args). Add a command here.
COMMANDS = {
    "plan": "sharelora_kernels.cli.plan",
    "finetune": "sharelora_kernels.cli.finetune",
    "compare": "sharelora_kernels.cli.compare",
    "bench": "sharelora_kernels.benchmarks",
    "gpu-check": "sharelora_kernels.cli.gpu_check",
}


def main(argv: list[str] | None = None) -> int:
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
