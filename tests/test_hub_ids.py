"""Every hub id FusionBench ships (configs, code, docs, examples) is in the table of known-good ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "fusion_bench" / "data" / "hub_ids.yaml"
# an owner/name token; a name ending in '_' or '-' or followed by '$', '{', '*', '<' is a pattern, not an id
ID = re.compile(r"(?<![\w./-])([A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9])(?![\w$.{*<-])")


def _table() -> dict[str, dict[str, str]]:
    return yaml.safe_load(TABLE.read_text())


def _owners(table: dict[str, dict[str, str]]) -> set[str]:
    return {name.split("/")[0] for section in table.values() for name in section}


def _scanned_files() -> list[Path]:
    files = [
        *(ROOT / "fusion_bench").rglob("*.yaml"),
        *(ROOT / "fusion_bench").rglob("*.py"),
        *(ROOT / "docs").glob("*.md"),
        ROOT / "README.md",
        *(ROOT / "examples").rglob("*.sh"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    return [p for p in files if p != TABLE]


def _ids_in(text: str, owners: set[str]) -> set[str]:
    return {m for m in ID.findall(text) if m.split("/")[0] in owners}


def test_table_is_well_formed() -> None:
    table = _table()
    assert set(table) == {"models", "datasets", "not_hub_ids"}
    for section in table.values():
        for name, where in section.items():
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", name), name
            assert isinstance(where, str) and where.strip(), f"{name}: say where it was confirmed"
    # the Cars expert has a hyphen, the Cars dataset an underscore
    assert "tanganke/clip-vit-base-patch32_stanford-cars" in table["models"]
    assert "tanganke/stanford_cars" in table["datasets"]
    assert not any(n.endswith("_stanford_cars") for n in table["models"])


def test_every_shipped_hub_id_is_known() -> None:
    table = _table()
    known = {name for section in table.values() for name in section}
    owners = _owners(table)
    unknown = {}
    for path in _scanned_files():
        for name in _ids_in(path.read_text(errors="replace"), owners) - known:
            unknown.setdefault(name, str(path.relative_to(ROOT)))
    assert not unknown, f"hub ids not in {TABLE.name} (typo, or add them with where they were confirmed): {unknown}"


@pytest.mark.parametrize(
    "text, found",
    [
        (
            "pretrained_model_name_or_path: tanganke/clip-vit-base-patch32_stanford_cars",
            {"tanganke/clip-vit-base-patch32_stanford_cars"},
        ),
        ("tanganke/clip-vit-base-patch32_${task} and openai/clip-vit-* and tanganke/<key>", set()),
        ("see ./tanganke/x and models/tanganke/y", set()),
    ],
)
def test_scanner_finds_ids_and_skips_patterns(text: str, found: set[str]) -> None:
    assert _ids_in(text, {"tanganke", "openai"}) == found
