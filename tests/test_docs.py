"""The project's documentation stands on its own: every link a user meets in the README, the configs,
docstrings and docs/ points inside the repository or to a public URL, and the licence is declared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: notes that exist only on the developers' machines, never in the repository
PRIVATE = re.compile(
    r"shared/|reference/|STYLE\.md|seeds/|verified\.md|ARCHITECTURE\.md|(?<!docs/)\bmethods\.md"
)


def user_facing_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for folder, pattern in (("src", "*.py"), ("src", "*.yaml")):
        files += sorted((REPO / folder).rglob(pattern))
    return files


def test_no_link_points_to_notes_outside_the_repository():
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in user_facing_files()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert hits == []


def test_every_docs_path_mentioned_exists():
    mentioned = {
        m
        for path in user_facing_files()
        for m in re.findall(r"\bdocs/[\w.-]+\.md", path.read_text(encoding="utf-8"))
    }
    assert {"docs/methods.md", "docs/benchmarks.md"} <= mentioned
    assert sorted(m for m in mentioned if not (REPO / m).is_file()) == []
    readme_links = re.findall(r"\]\(((?!https?://|#)[^)]+)\)", (REPO / "README.md").read_text())
    assert sorted(link for link in readme_links if not (REPO / link.split("#")[0]).exists()) == []


@pytest.mark.parametrize("page", ["methods.md", "benchmarks.md"])
def test_method_and_benchmark_notes_name_the_official_repositories(page):
    text = (REPO / "docs" / page).read_text()
    expected = {
        "methods.md": [
            "github.com/Chen-Junyang-cn/PLI",
            "github.com/navervision/lincir",
            "arxiv.org/abs/2406.18836",
        ],
        "benchmarks.md": [
            "github.com/Cuberick-Orion/CIRR",
            "github.com/miccunifi/CIRCO",
            "github.com/XiaoxiaoGuo/fashion-iq",
            "github.com/facebookresearch/genecis",
        ],
    }[page]
    assert [url for url in expected if f"https://{url}" not in text] == []


def test_the_licence_is_apache_2_with_an_spdx_string():
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.MULTILINE)
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
