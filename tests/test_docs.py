"""The documentation holds together: every relative link in README.md and docs/*.md names a file that exists
(and, with a #fragment into a Markdown file, one of its headings), and nothing in the tree still cites the
former specification by section: the method is described in docs/method.md, which code and tests cite."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# "SPEC section 5", "SPEC sections 1 and 7", "SPEC §3", "SPEC's", "SPEC.md", "the SPEC", "as SPEC describes"
FORMER_SPEC = re.compile(r"SPEC(?:\.md| sections?\b| §|'s| of this project)|\b(?:the|as) SPEC\b")
SKIP_DIRS = {
    ".venv",
    ".git",
    ".snakemake",
    "results",
    "data",
    "checkpoints",
    "logs",
    "models",
    "mlruns",
    "mlartifacts",
    "node_modules",
    "__pycache__",
    ".dvc",
    ".pytest_cache",
    ".ruff_cache",
}
SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".smk", ".toml", ".cfg", ".txt", ".json"}
SOURCE_NAMES = {"Snakefile", "Makefile"}


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


def links(path: Path) -> list[str]:
    text = CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)
    return [m.group(1) or m.group(2) for m in LINK.finditer(text)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{path.relative_to(ROOT)}: {target} (no heading #{fragment} in {dest.name})")
    return broken


def test_docs_exist():
    for name in ("method", "reproducing", "pipeline", "reliability", "benchmarks", "evaluation", "results"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


def test_relative_links_resolve():
    broken = [line for doc in documents() for line in broken_links(doc)]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_link_checker_catches_a_broken_link(tmp_path):
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# A heading\n")
    doc.write_text(
        "[ok](b.md) [ok](b.md#a-heading) [web](https://example.org) `[code](nope.md)`\n"
        "[missing](nope.md) [bad anchor](b.md#other)\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = broken_links(doc)
    finally:
        ROOT = saved
    assert found == ["a.md: nope.md (no such file)", "a.md: b.md#other (no heading #other in b.md)"]


def test_method_sections_are_numbered_like_their_citations():
    """docs/method.md has §1..§8 (and §5b); every "docs/method.md §N" cited anywhere names one of them."""
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## §(\w+) ", method, re.M))
    assert sections == {"1", "2", "3", "4", "5", "5b", "6", "7", "8"}
    cited = set()
    for path in source_files():
        for first, second in re.findall(
            r"method\.md §(\d+b?)(?:\s*(?:and|-)\s*§(\d+b?))?", path.read_text(encoding="utf-8", errors="replace")
        ):
            cited |= {first, second} - {""}
    assert cited and cited <= sections, sorted(cited - sections)


def source_files() -> list[Path]:
    """Source and documentation files of the tree, outside the environment, VCS and pipeline outputs."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(folder) / name for name in files if Path(name).suffix in SOURCE_SUFFIXES or name in SOURCE_NAMES]
    return out


def test_no_citation_of_the_former_spec():
    me = Path(__file__).resolve()
    found = []
    for path in source_files():
        if path.resolve() == me:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FORMER_SPEC.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "cite docs/method.md §N instead:\n" + "\n".join(found)
