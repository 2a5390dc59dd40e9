"""The documentation against the repository: every relative link of README.md and docs/ resolves to a file (and
heading) inside the repository, every public name has a docstring that docs/api.md shows as generated, the
README's quick start runs as written, and the version is the same everywhere it is written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import imm_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import apidoc  # noqa: E402  (docs/apidoc.py: the API reference generator)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def links(page: Path) -> list[str]:
    """Markdown link and image targets outside code blocks and inline code."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    slugs = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        slugs.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    problems = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if path.startswith("/") or not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: leaves the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    text = page.read_text()
    problems += [f"mentions {p!r}" for p in ("../shared", "/work/") if p in text]
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_every_public_name_has_a_docstring():
    assert not apidoc.undocumented(), f"public names without a docstring: {apidoc.undocumented()}"


def test_api_reference_is_current():
    generated = apidoc.render()
    assert (ROOT / "docs" / "api.md").read_text() == generated, (
        f"docs/api.md is stale (a public signature or docstring changed): regenerate it with `{apidoc.COMMAND}`")
    for name in imm_kernels.__all__:
        if name != "__version__":
            assert f"`imm_kernels.{name}`" in generated, f"docs/api.md does not show imm_kernels.{name}"


def test_readme_quick_start_runs_as_written(tmp_path):
    """The first python block of README.md, as a script of its own, from a folder outside the checkout."""
    code = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the README's quick start failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.startswith("loss "), result.stdout


def test_one_version_everywhere():
    version = imm_kernels.__version__
    citation = re.search(r"^version:\s*\"?([^\"\s]+)", (ROOT / "CITATION.cff").read_text(), re.M).group(1)
    changelog = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert citation == version and changelog == version, (version, citation, changelog)
