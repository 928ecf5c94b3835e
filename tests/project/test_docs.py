"""The README is a landing page and docs/ a site that builds: checks that keep both honest.

The README must show the two commands on its first screen; every page in docs/ must be in
mkdocs.yml's nav (and every nav entry a page); every relative link, in the README and between
the pages, must resolve. With mkdocs installed (the `docs` extra) the site must also build
with `--strict`, which adds the anchors and the theme.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"

INSTALL_AND_TRAIN = ('pip install torch==2.13.0 -e ".[test]" && python -m sorted_jax.train '
                     "--config=configs/tiny.py --workdir=runs/tiny")
TEST_COMMAND = "python -m pytest -q"

# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(markdown: str) -> Iterator[str]:
    """The link targets of a Markdown text that point at a file (no URL, no pure anchor),
    leaving out code blocks and code spans, where brackets are code."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0]


def nav_pages(nav: list) -> Iterator[str]:
    """Every page of an mkdocs nav: entries are 'page.md', {title: 'page.md'} or
    {section: [entries]}."""
    for entry in nav:
        items = entry.values() if isinstance(entry, dict) else [entry]
        for item in items:
            if isinstance(item, list):
                yield from nav_pages(item)
            elif not re.match(r"^[a-z]+://", item):
                yield item


def mkdocs_config() -> dict:
    return yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))


def test_readme_first_screen_has_both_commands():
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:40])
    assert INSTALL_AND_TRAIN in first_screen
    assert TEST_COMMAND in first_screen


def test_nav_and_docs_pages_match():
    config = mkdocs_config()
    assert config["theme"]["name"] == "material"
    assert config.get("docs_dir", "docs") == "docs"
    listed = list(nav_pages(config["nav"]))
    assert len(listed) == len(set(listed)), f"a page is in the nav twice: {listed}"
    missing = [p for p in listed if not (DOCS / p).is_file()]
    assert not missing, f"in mkdocs.yml's nav but not in docs/: {missing}"
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    omitted = [p for p in pages if p not in listed]
    assert not omitted, f"in docs/ but not in mkdocs.yml's nav: {omitted}"


def test_readme_relative_links_resolve():
    targets = list(relative_links(README.read_text(encoding="utf-8")))
    assert any(t.startswith("docs/") for t in targets), "the README links no docs page"
    broken = [t for t in targets if not (REPO / t).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_docs_relative_links_stay_in_docs_and_resolve(page):
    """mkdocs --strict rejects a link that leaves docs/; paths to repo files are code spans."""
    broken = []
    for target in relative_links((DOCS / page).read_text(encoding="utf-8")):
        resolved = (DOCS / target).resolve()
        if not resolved.is_relative_to(DOCS.resolve()) or not resolved.exists():
            broken.append(target)
    assert not broken, f"docs/{page}: links that leave docs/ or do not resolve: {broken}"


def test_relative_links_finds_only_file_links():
    text = ("[a](docs/x.md#part) ![b](docs/p.png) [c](https://e.org/y.md) [d](#anchor) "
            "`[e](not/a/link.md)`\n```\n[f](code.md)\n```\n")
    assert list(relative_links(text)) == ["docs/x.md", "docs/p.png"]


def test_mkdocs_strict_build(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip('mkdocs / mkdocs-material not installed (pip install -e ".[docs]")')
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
