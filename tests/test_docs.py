"""The generated docs (issue 12): docs/recipes/*.md list every recipe field with its type, default and meaning, read
from the config dataclasses; a page that differs from a fresh generation fails here (run `kiln docs`); a field
without a comment cannot be generated; `kiln docs` also draws docs/pipeline.png."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from kiln.config_docs import UndocumentedField, field_comments, sections
from kiln.docs_pages import PAGES, page_markdown, stale_pages

REPO = Path(__file__).resolve().parents[1]


def test_committed_pages_match_the_code():
    stale = stale_pages(REPO / "docs")
    assert not stale, f"docs/ is stale: {stale}; run `kiln docs` from the repository root and commit the pages"


@pytest.mark.parametrize(
    "page, rows",
    [
        (
            "recipes/data.md",
            ["`executor.slurm.partition` | str \\| null | `null` |", "`filters[].ngram` | int | `13` |"],
        ),
        ("recipes/pretrain.md", ["`parallel.tp` | int | `1` |", "`data.meco.cooldown_fraction` | float | `0.1` |"]),
        (
            "recipes/sft.md",
            [
                "`data` | SFTDataConfig | required |",
                "`data.mix.eta` | float | `0.2` |",
                '`data.sources[].role` | "agent" \\| "general" |',
            ],
        ),
    ],
)
def test_pages_list_nested_fields_by_their_recipe_key(page, rows):
    (spec,) = [p for p in PAGES if p.path == page]
    text = page_markdown(spec)
    for row in rows:
        assert row in text


def test_every_field_of_every_section_is_on_its_page():
    """Each config class reachable from a page's recipe contributes one row per field, none without a meaning."""
    for page in PAGES:
        for section in sections(page.root(), skip=page.skip, rename=page.rename):
            names = [f.name for f in dataclasses.fields(section.cls) if f.init and f.name not in
                     (page.skip if not section.key else ())]  # fmt: skip
            assert len(section.rows) == len(names), (page.path, section.key)
            assert all(row.meaning.strip() for row in section.rows), (page.path, section.key)
    sft = page_markdown([p for p in PAGES if p.path == "recipes/sft.md"][0])
    assert "| `synthetic_data` |" not in sft and "`data.datasets" not in sft  # the SFT page's data is the builder's


@dataclass
class _Example:
    """An example section.

    documented_in_docstring: taken from the class docstring's entry.
    """

    # the block above a field
    # spans lines
    above: int = 1
    trailing: str = "x"  # the comment beside it
    documented_in_docstring: bool = True
    with_docstring: list[int] = field(default_factory=list)
    """An attribute docstring."""
    kind: Literal["a", "b"] = "a"  # fmt: skip


@dataclass
class _Undocumented:
    fine: int = 0  # has a comment
    bare: float = 1.0


def test_meanings_come_from_comments_docstring_entries_and_attribute_docstrings():
    comments = field_comments(_Example)
    assert comments["above"] == "the block above a field spans lines"
    assert comments["trailing"] == "the comment beside it"
    assert comments["with_docstring"] == "An attribute docstring."
    assert "kind" not in comments  # a formatter pragma is not a meaning
    (section,) = sections(_Example, skip=frozenset({"kind"}))
    rows = {r.key: r for r in section.rows}
    assert rows["documented_in_docstring"].meaning == "taken from the class docstring's entry."
    assert rows["with_docstring"].default == "[]" and rows["trailing"].default == "x"
    assert section.intro == "An example section."  # the entries are in the table, not repeated above it


def test_a_field_without_a_comment_fails_the_generation_with_its_line():
    source, start = inspect.getsourcelines(_Undocumented)
    line = start + next(i for i, text in enumerate(source) if text.strip().startswith("bare:"))
    with pytest.raises(UndocumentedField, match=rf"_Undocumented\.bare \(test_docs\.py:{line}\) has no comment"):
        sections(_Undocumented)


def test_kiln_docs_writes_the_pages_and_the_picture_and_checks_them(tmp_path, capsys):
    from kiln.cli import main

    out = tmp_path / "docs"
    assert main(["docs", "--out", str(out)]) == 0
    for page in PAGES:
        assert (out / page.path).read_text(encoding="utf-8") == (REPO / "docs" / page.path).read_text(encoding="utf-8")
    png = (out / "pipeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert main(["docs", "--out", str(out), "--check"]) == 0
    (out / "recipes" / "sft.md").write_text("hand-edited\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["docs", "--out", str(out), "--check"]) == 1
    assert "stale or missing" in capsys.readouterr().out and "recipes/sft.md" not in stale_pages(REPO / "docs")
