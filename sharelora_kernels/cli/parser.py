"""The command line's argparse parts: help that wraps at word boundaries (an option name is never
split), and usage errors in one line naming the command, with a "did you mean ...?"."""
from __future__ import annotations

import argparse
import difflib
import re
import textwrap


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    return textwrap.wrap(text, max(width, 20), initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


class HelpFormatter(argparse.HelpFormatter):
    """Option help and descriptions wrapped at word boundaries to the terminal's width; indented lines
    of a description (file lists, examples) are kept as written."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return _wrap(" ".join(text.split()), width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines: list[str] = []
        paragraph: list[str] = []
        for line in text.splitlines() + [""]:
            if line.strip() and not line[0].isspace():
                paragraph.append(line.strip())
                continue
            if paragraph:
                lines += _wrap(" ".join(paragraph), width, indent)
                paragraph = []
            lines.append(indent + line if line.strip() else "")
        return "\n".join(lines).rstrip() + "\n"


def did_you_mean(word: str, candidates) -> str:
    """" (did you mean X?)" for the candidate closest to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with ``HelpFormatter`` whose errors are one line (no usage block) that
    suggests the closest option or choice and points to ``--help``; exit status 2 as argparse's.

    An option no command knows is reported by that command's parser (its name, not the top level's):
    ``parse_args`` looks it up in the namespace's ``command_parser`` (``__main__`` sets it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = getattr(parsed, "command_parser", self)
            options = [s for s in parser._option_string_actions if s.startswith("--")]
            hint = did_you_mean(extras[0].split("=", 1)[0], options) if extras[0].startswith("-") else ""
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
