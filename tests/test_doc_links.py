"""Every relative link in the documentation reaches a file, and every ``#anchor`` a heading of that file.

Checked: ``README.md`` at the repository root, ``bundle/docs/*.md`` and ``deploy/*.md``. Anchors follow GitHub's
heading slugs (lower case; every character that is not a letter, digit, space, ``-`` or ``_`` dropped; each space
one ``-``; a repeated slug gets ``-1``, ``-2``, ...). Links and headings inside fenced code blocks and inline code do
not count. The bundle's pages travel in the release zip, so they must not link outside ``bundle/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
DOCS = [REPO / "README.md", *sorted((BUNDLE / "docs").glob("*.md")), *sorted((REPO / "deploy").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def heading_text(raw: str) -> str:
    """The text GitHub renders for a heading: inline code kept as text, links as their text, emphasis dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    return re.sub(r"`([^`]*)`", r"\1", text)


def slug(text: str) -> str:
    """GitHub's anchor for a heading text (without the duplicate suffix)."""
    return re.sub(r"[^\w\- ]", "", heading_text(text).strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    """The link targets of a markdown text (prose only; inline code spans removed first)."""
    targets = []
    for line in prose_lines(text):
        targets += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return targets


def broken_links(page: Path) -> list[str]:
    """One message per relative link of ``page`` whose file or anchor does not exist."""
    problems = []
    for target in links(page.read_text()):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: '{target}': no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{page.name}: '{target}': {dest.name} has no heading with anchor '#{anchor}'")
    return problems


# ---- the checker itself, on hand-made pages


@pytest.mark.parametrize(
    ("heading", "expected"),
    [  # worked by hand with github-slugger's rules
        ("DICOM series: refused before any output", "dicom-series-refused-before-any-output"),
        ("From DICOM (planning CT + RTSTRUCT)", "from-dicom-planning-ct--rtstruct"),
        ("dMoE overhead (`bench/bench_dmoe.py`, `make bench-dmoe`)", "dmoe-overhead-benchbench_dmoepy-make-bench-dmoe"),
        (
            "How the recipe's defaults were chosen (validation split)",
            "how-the-recipes-defaults-were-chosen-validation-split",
        ),
        ("2D benchmarks", "2d-benchmarks"),
        ("The FairDRO loss (`dro` in train.json)", "the-fairdro-loss-dro-in-trainjson"),
    ],
)
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_checker_finds_missing_pages_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text(
        "# A\n\n## Two words\n\n## Two words\n\n```bash\n# not a heading\n[x](gone.md)\n```\n\n"
        "[ok](b.md#real-one) [ok](#two-words-1) [ok](b.md) `[code](nowhere.md)` [web](https://example.org/x#y)\n"
        "[bad](b.md#not-a-heading) [bad](missing.md) [bad](#not-a-heading) [bad](#two-words-2)\n"
    )
    (tmp_path / "b.md").write_text("# B\n\n### Real one\n\n```\n# Not a heading\n```\n")
    problems = broken_links(tmp_path / "a.md")
    assert len(problems) == 4, problems
    assert [p.split("'")[1] for p in problems] == ["b.md#not-a-heading", "missing.md", "#not-a-heading", "#two-words-2"]


# ---- the real documentation


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_reaches_its_page_and_anchor(page):
    assert not broken_links(page), "\n".join(broken_links(page))


@pytest.mark.parametrize("page", sorted((BUNDLE / "docs").glob("*.md")), ids=lambda p: p.name)
def test_bundle_pages_link_only_inside_the_bundle(page):
    """The release zip holds bundle/ only: a link from its pages to the rest of the repository would dangle there."""
    outside = []
    for target in links(page.read_text()):
        path = target.partition("#")[0]
        if path and not EXTERNAL.match(target) and not (page.parent / path).resolve().is_relative_to(BUNDLE):
            outside.append(target)
    assert not outside, f"{page.name} links outside bundle/: {outside}"
