"""The docs users read say what the code does: every Python snippet in them runs as written on the
built-in model (or says on its first line, ``# needs: ...``, what it needs), and they speak to users
only (no links out of the repository, no words about how the project is developed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS = "# needs:"  # first line of a snippet that does not run on the built-in model, and what it needs
# The docs users read: every markdown file but the benchmark results the harness writes.
DOCS = sorted(p for p in ROOT.rglob("*.md") if not {".git", "results", "node_modules"} & set(p.relative_to(ROOT).parts)
              and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))
PROCESS_WORDS = re.compile(r"\bissues?[ -]?\d|\bthis task\b|\bwas not drawn\b|\bwho was lent\b|\bthe lead\b|\.\./shared"
                           r"|METHOD\.md|METHOD section", re.I)


def snippets(path: Path) -> list[tuple[int, str]]:
    """(line, code) of every fenced ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def runnable(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, code in snippets(path) if not code.lstrip().startswith(NEEDS)]


CHILD = r"""
import json, sys, traceback
failures = []
for line, code in json.loads(sys.argv[1]):
    try:
        exec(compile(code, f"{sys.argv[2]}:{line}", "exec"), {"__name__": "__main__"})  # a fresh namespace each
    except Exception:
        failures.append(f"{sys.argv[2]}, snippet at line {line}:\n{traceback.format_exc(limit=-3)}")
print(json.dumps(failures))
"""


def test_the_docs_are_found():
    names = {str(p.relative_to(ROOT)) for p in DOCS}
    assert {"README.md", "bench/README.md", "csrc/README.md", "sharelora_kernels/ops/README.md"} <= names
    assert sum(len(runnable(p)) for p in DOCS) >= 5


@pytest.mark.parametrize("doc", [p for p in DOCS if runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_snippet_runs(doc, tmp_path):
    """Each snippet in a fresh namespace, all of one doc in one process (started in an empty folder:
    the files a snippet writes land there)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SHARELORA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runnable(doc)), str(doc.relative_to(ROOT))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == [], "\n".join(failures)


def test_snippets_that_cannot_run_here_say_what_they_need():
    for doc in DOCS:
        for line, code in snippets(doc):
            first = code.splitlines()[0] if code.strip() else ""
            if "path/to/" in code or "cuda" in code.replace("cuda_stream", ""):
                assert first.startswith(NEEDS), f"{doc.name}:{line} needs something: say so on its first line"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_to_users(doc):
    text = doc.read_text(encoding="utf-8")
    assert PROCESS_WORDS.findall(text) == []
    assert re.findall(r"https?://", text) == [], "no links out of the repository: the docs must stand alone"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):  # every relative link points at a file here
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"



def test_the_package_speaks_to_users():
    """Docstrings and messages (``help()``, errors) point only at what users have: the README, not
    notes outside the repository."""
    for path in sorted((ROOT / "sharelora_kernels").rglob("*.py")):
        assert PROCESS_WORDS.findall(path.read_text(encoding="utf-8")) == [], path.relative_to(ROOT)


def test_readme_first_screen_and_length():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) < 400
    first_screen = "\n".join(lines[:60])
    assert "<!-- test-command -->\n```\n" in first_screen and "<!-- main-command -->" in first_screen
    assert "```python" in first_screen  # the ten-line example
    example = runnable(ROOT / "README.md")[0][1]
    assert len(example.strip().splitlines()) <= 10
    assert "## Contents" in text[: text.index("## The methods")]
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", text):  # the table of contents points at real headings
        headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}
        assert anchor in headings, anchor
