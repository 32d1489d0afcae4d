"""The documentation: README stays the newcomer's page, the docs site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 200
    # the set-up commands and the command CI runs stay on the first page
    assert "make demo" in text and "make test" in text
    targets = re.findall(r"\]\(((?:docs/)[^)#]+)", text)
    assert targets, "README links into docs/"
    missing = [t for t in targets if not (REPO / t).is_file()]
    assert not missing, f"README links to missing pages: {missing}"


def test_every_docs_page_is_in_the_nav():
    cfg = yaml.safe_load((REPO / "mkdocs.yml").read_text().replace("!!python", "#"))

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    in_nav = set(pages(cfg["nav"]))
    on_disk = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert on_disk - in_nav == set(), "pages missing from mkdocs.yml's nav"
    assert in_nav - on_disk == set(), "nav entries without a page"


def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the API reference is generated from the docstrings, not left empty
    html = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "intra_supcon" in html and "Eq. 4" in html
