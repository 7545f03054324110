"""docs/ARCHITECTURE.md's package tree tells the truth: every path it lists exists, and every module file of
``src/sparseattn/``, ``benchmarks/`` and ``tests/`` is listed.

The tree is the first fenced block under "## Package tree". A line whose first word starts before the
description column is an entry (two spaces of indent per level; a trailing ``/`` marks a folder); every
``name.py`` in the rest of the line or its continuation lines names a file next to the entry, or inside it
when the entry is a folder. A package's own ``__init__.py`` is implied by its folder's entry.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
_PY = re.compile(r"(?<![\w/.])([A-Za-z_]\w*\.py)\b")


def _tree_block() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    sec = text.split("## Package tree", 1)[1]
    block = sec.split("```", 2)[1]
    return [ln for ln in block.split("\n")[1:] if ln.strip()]


def _listed() -> tuple[set[str], set[str]]:
    """(files, folders) the tree names, as paths relative to the repository root."""
    lines = _tree_block()
    desc_col = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.startswith(" " * 20))
    files: set[str] = set()
    folders: set[str] = set()
    stack: list[str] = []
    current = ""  # the folder a description's file names live in
    for ln in lines:
        indent = len(ln) - len(ln.lstrip())
        rest = ln
        if indent < desc_col:
            word, _, rest = ln.strip().partition(" ")
            word = word.rstrip(";,")
            depth = indent // 2
            del stack[depth:]
            path = "/".join(stack + [word.rstrip("/")])
            if word.endswith("/"):
                folders.add(path)
                stack.append(word.rstrip("/"))
                current = path
            else:
                files.add(path)
                current = "/".join(stack)
        for name in _PY.findall(rest):
            files.add(f"{current}/{name}" if current else name)
    return files, folders


def _actual() -> set[str]:
    out = set()
    for base in ("src/sparseattn", "benchmarks", "tests"):
        for p in (ROOT / base).rglob("*.py"):
            rel = p.relative_to(ROOT).as_posix()
            if "/results/" in rel or "__pycache__" in rel:
                continue
            if p.name == "__init__.py" and p.parent != ROOT / "src" / "sparseattn":
                continue  # implied by the package's folder entry
            out.add(rel)
    return out


def test_every_listed_path_exists():
    files, folders = _listed()
    missing = sorted(p for p in files if not (ROOT / p).is_file()) + sorted(p for p in folders if not (ROOT / p).is_dir())
    assert not missing, f"docs/ARCHITECTURE.md lists paths that do not exist: {missing}"


def test_every_module_file_is_listed():
    files, _ = _listed()
    unlisted = sorted(_actual() - files)
    assert not unlisted, f"docs/ARCHITECTURE.md's package tree does not list: {unlisted}"


def test_the_tree_block_is_found():
    files, folders = _listed()
    assert "src/sparseattn/__init__.py" in files and "src/sparseattn/ops" in folders and "tests/ops" in folders
