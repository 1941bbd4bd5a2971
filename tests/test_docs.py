"""The user documentation: README.md and docs/*.md.

Users read these files without the project's history or its internal contract, so they must
stay short (the README), free of measurement history and internal references, and every
relative link between them must lead somewhere.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 350

_ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
             "thirteenth|fourteenth|fifteenth|\\d+(?:st|nd|rd|th)")
HISTORY = {
    "measurement round": re.compile(rf"\b(?:{_ORDINALS})\s+rounds?\b|\bmeasurement rounds?\b|\brounds? of measurements?\b",
                                    re.IGNORECASE),
    "issue number": re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE),
    "#N reference": re.compile(r"(?<![\w&/])#\d+\b"),
    "machine model": re.compile(r"\b(?:Xeon|EPYC|Zen ?\d|AVX-?2|AVX-?512\w*|AMX|Sapphire Rapids|Sapphire|Ice Lake)\b",
                                re.IGNORECASE),
    "internal contract": re.compile(r"\bSPEC\b"),
}
# A commit-like id: 7 to 40 hex digits with at least one digit and one letter, in prose only.
COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced and indented code blocks, with inline code emptied."""
    out, fenced, in_code, previous_blank = [], False, False, True
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, previous_blank = not fenced, False
            continue
        if fenced:
            continue
        if line.startswith("    ") and (previous_blank or in_code):
            in_code = True
            continue
        blank = not line.strip()
        in_code = in_code and blank
        previous_blank = blank
        out.append((number, re.sub(r"`[^`]*`", "``", line)))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in _prose(path.read_text(encoding="utf-8")):
        found.extend((number, target) for target in LINK.findall(line))
    return found


def test_there_are_docs():
    assert README.is_file()
    names = {p.name for p in DOCS}
    assert {"method.md", "rotary.md", "benchmarks.md", "reliability.md", "json.md"} <= names
    assert "healing-rounds.md" not in names


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_readme_test_command_is_what_ci_runs():
    readme = README.read_text(encoding="utf-8").splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    command = next(line.strip() for line in ci if "pytest" in line and not line.lstrip().startswith("#"))
    assert readme[0] == "# collabcompress"
    assert readme[8].strip().endswith(command), "the README's second command must end with the line .ci/run runs"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_no_history_or_internal_references(path):
    text = path.read_text(encoding="utf-8")
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        problems += [f"{path.name}:{number}: {what}: {line.strip()[:100]}"
                     for what, pattern in HISTORY.items() if pattern.search(line)]
    for number, line in _prose(text):
        if COMMIT.search(line):
            problems.append(f"{path.name}:{number}: commit-like id: {line.strip()[:100]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    broken = []
    for number, target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.name}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{path.name}:{number}: {target} (no such heading in {dest.name})")
    assert not broken, "\n".join(broken)


def _tables_without_separator(text: str) -> list[int]:
    """Lines starting a markdown table whose next line is not its |---| separator row."""
    lines = text.splitlines()
    return [k + 1 for k, line in enumerate(lines) if line.startswith("|")
            and (k == 0 or not lines[k - 1].startswith("|"))
            and not (k + 1 < len(lines) and re.fullmatch(r"\|[-:| ]+\|", lines[k + 1].strip()))]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_tables_render(path):
    """Every table's header is followed by its separator row (rows above it break the table)."""
    assert _tables_without_separator(path.read_text(encoding="utf-8")) == []


def test_every_doc_is_reachable_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in _links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"not linked from README.md: {missing}"


def test_the_checks_catch_what_they_are_for():
    assert HISTORY["measurement round"].search("in the eleventh round we measured")
    assert HISTORY["measurement round"].search("the 3rd round")
    assert not HISTORY["measurement round"].search("rounded up to a multiple of 8")
    assert HISTORY["issue number"].search("the runtime of issue 15")
    assert HISTORY["#N reference"].search("see #31")
    assert not HISTORY["#N reference"].search("[Install](#install)")
    assert HISTORY["machine model"].search("an AMD EPYC Zen 3 with AVX2")
    assert HISTORY["machine model"].search("AVX512-BF16 or AMX")
    assert not HISTORY["machine model"].search("example text")
    assert HISTORY["internal contract"].search("(SPEC section 5)")
    assert COMMIT.search("the runtime at git 9a0e71e")
    assert not COMMIT.search("1,774,080 parameters and 23592960 bytes, decade, facade")
    assert _prose("text\n\n    code 9a0e71e\n\nafter `19d19c5` here") == [(1, "text"), (2, ""), (4, ""),
                                                                           (5, "after `` here")]
    assert _slug("Rotary decoder: SmolLM2-135M-Instruct") == "rotary-decoder-smollm2-135m-instruct"
    assert _slug("What `report` counts") == "what-report-counts"
    assert _tables_without_separator("| a | b |\n| 1 | 2 |\n|---|---|\n") == [1]
    assert _tables_without_separator("text\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\n") == []
