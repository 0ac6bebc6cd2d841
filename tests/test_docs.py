"""Every repository path that README.md and docs/ mention exists (a newcomer follows them literally)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_LEVEL = (
    "core",
    "datasets",
    "gen",
    "recon",
    "eval",
    "cluster",
    "configs",
    "bench",
    "docs",
    "tests",
    ".ci",
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE_PATH = re.compile(r"`((?:{})/[^`\s]*)`".format("|".join(re.escape(t) for t in TOP_LEVEL)))


def _mentioned(doc: Path) -> list[tuple[str, Path]]:
    text = doc.read_text()
    found = [(m, doc.parent / m) for m in LINK.findall(text) if not re.match(r"[a-z]+://|mailto:", m)]
    found += [(m, ROOT / m) for m in CODE_PATH.findall(text)]
    return found


def _exists(path: Path) -> bool:
    """A file or folder, or a glob pattern (``bench/bench_*.py``) that matches one."""
    return path.exists() or ("*" in str(path) and any(ROOT.glob(str(path.relative_to(ROOT)))))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_mentioned_paths_exist(doc):
    missing = [text for text, path in _mentioned(doc) if "{" not in text and not _exists(path.resolve())]
    assert not missing, f"{doc.name} mentions paths that do not exist: {missing}"


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    for name in ("architecture.md", "formats.md", "metrics.md", "tutorial.md", "benchmark.md", "cluster.md"):
        assert (ROOT / "docs" / name).is_file(), name
        assert f"docs/{name}" in readme, f"README does not link docs/{name}"
