"""Every ``python`` block of docs/python_snippets.md runs, with hub ids replaced by tiny local models/datasets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python_snippets.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def substitutions(tiny_example, tmp_path_factory):
    """Hub id (quoted) -> tiny local folder (quoted); the tiny ViT and its 3-class dataset for the framework."""
    from fusion_bench.testing.tiny_classifiers import build_tiny_image_dataset, build_tiny_vit

    root = tmp_path_factory.mktemp("docs_snippets")
    experts = sorted(tiny_example.finetuned.values())
    return {
        '"openai/clip-vit-base-patch32"': repr(str(tiny_example.base_model)),
        '"tanganke/clip-vit-base-patch32_sun397"': repr(str(experts[0])),
        '"tanganke/clip-vit-base-patch32_stanford-cars"': repr(str(experts[1])),
        '"google/vit-base-patch16-224"': repr(str(build_tiny_vit(root / "vit", num_labels=2, seed=0))),
        '"tanganke/eurosat"': repr(
            str(
                build_tiny_image_dataset(
                    root / "rgb", classnames=["a", "b", "c"], n_train_per_class=4, n_test_per_class=2, seed=1
                )
            )
        ),
        "num_classes=10": "num_classes=3",
        "# ViT-B/32: 87,456,000": "",
    }


def test_the_page_has_snippets():
    assert len(BLOCKS) == 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs(substitutions, tmp_path, monkeypatch, index):
    code = BLOCKS[index]
    for old, new in substitutions.items():
        code = code.replace(old, new)
    assert not re.search(r'"(openai|tanganke|google)/', code), code
    monkeypatch.chdir(tmp_path)  # snippets write under outputs/
    exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": "__snippet__"})
    if "save_pretrained(" in code:
        assert (tmp_path / "outputs" / "vit_eurosat" / "config.json").is_file()
