"""The built-in zero-shot data of the CLIP tasks (the eight + the twelve of the 20-task benchmark)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from fusion_bench.data.clip_tasks import (
    ALIASES,
    TALL20_TASK_NAMES,
    TASK_NAMES,
    canonical_task_name,
    load_classnames_and_templates,
)
from fusion_bench.errors import UnknownNameError

# (number of classes, number of templates) of the published prompt sets (task_vectors).
EXPECTED_COUNTS = {
    "sun397": (397, 2),
    "stanford_cars": (196, 8),
    "resisc45": (45, 18),
    "eurosat": (10, 3),
    "svhn": (10, 1),
    "gtsrb": (43, 3),
    "mnist": (10, 1),
    "dtd": (47, 8),
    # the twelve more of the TALL-masks benchmark (the reference's prompt sets)
    "oxford_flowers102": (102, 1),
    "pcam": (2, 1),
    "fer2013": (7, 6),
    "oxford_iiit_pet": (37, 1),
    "stl10": (10, 2),
    "cifar100": (100, 18),
    "cifar10": (10, 18),
    "food101": (101, 1),
    "fashion_mnist": (10, 2),
    "emnist_letters": (26, 1),
    "kmnist": (10, 1),
    "rendered_sst2": (2, 1),
}


def test_task_names_in_benchmark_order():
    assert TASK_NAMES == ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


@pytest.mark.parametrize("task", TALL20_TASK_NAMES)
def test_counts(task):
    classnames, templates = load_classnames_and_templates(task)
    assert (len(classnames), len(templates)) == EXPECTED_COUNTS[task]


@pytest.mark.parametrize("task", TALL20_TASK_NAMES)
def test_json_file_fields(task):
    data = json.loads((resources.files("fusion_bench.data.clip_tasks") / f"{task}.json").read_text(encoding="utf-8"))
    assert set(data) == {"task", "source", "classnames", "templates"}
    assert data["task"] == task
    assert isinstance(data["source"], str) and data["source"].strip()


@pytest.mark.parametrize("task", TALL20_TASK_NAMES)
def test_templates_have_one_placeholder_and_format(task):
    classnames, templates = load_classnames_and_templates(task)
    assert len(set(templates)) == len(templates)
    for template in templates:
        assert isinstance(template, str)
        assert template.count("{}") == 1
        assert template.count("{") == 1 and template.count("}") == 1  # no other fields
        for name in (classnames[0], classnames[-1]):
            text = template.format(name)
            assert name in text and "{" not in text


@pytest.mark.parametrize("task", TALL20_TASK_NAMES)
def test_classnames_unique_nonempty_strings(task):
    classnames, _ = load_classnames_and_templates(task)
    assert all(isinstance(c, str) and c and c == c.strip() for c in classnames)
    assert len(set(classnames)) == len(classnames)


@pytest.mark.parametrize(
    "task, index, name",
    [
        ("mnist", 0, "0"),
        ("mnist", 3, "3"),
        ("svhn", 9, "9"),
        ("eurosat", 0, "annual crop land"),
        ("eurosat", 2, "brushland or shrubland"),
        ("eurosat", 9, "lake or sea"),
        ("gtsrb", 0, "red and white circle 20 kph speed limit"),
        ("gtsrb", 14, "stop"),
        ("gtsrb", 42, "white circle with gray strike bar indicating no passing for trucks has ended"),
        ("dtd", 0, "banded"),
        ("dtd", 30, "polka-dotted"),
        ("dtd", 46, "zigzagged"),
        ("resisc45", 0, "airplane"),
        ("resisc45", 43, "thermal power station"),
        ("resisc45", 44, "wetland"),
        ("stanford_cars", 0, "AM General Hummer SUV 2000"),
        ("stanford_cars", 1, "Acura RL Sedan 2012"),
        ("stanford_cars", 173, "Ram C/V Cargo Van Minivan 2012"),
        ("stanford_cars", 195, "smart fortwo Convertible 2012"),
        ("sun397", 0, "abbey"),
        ("sun397", 8, "apartment building outdoor"),
        ("sun397", 212, "kindergarden classroom"),
        ("sun397", 351, "theater indoor procenium"),
        ("sun397", 396, "youth hostel"),
        ("oxford_flowers102", 0, "pink primrose"),
        ("oxford_flowers102", 101, "blackberry lily"),
        ("pcam", 1, "lymph node containing metastatic tumor tissue"),
        ("fer2013", 0, "angry"),
        ("fer2013", 6, "surprised"),
        ("oxford_iiit_pet", 0, "abyssinian"),
        ("oxford_iiit_pet", 36, "yorkshire_terrier"),
        ("stl10", 9, "truck"),
        ("cifar100", 0, "apple"),
        ("cifar100", 99, "worm"),
        ("cifar10", 1, "automobile"),
        ("food101", 0, "apple pie"),
        ("food101", 100, "waffles"),
        ("fashion_mnist", 9, "Ankle boot"),
        ("emnist_letters", 25, "Z"),
        ("kmnist", 0, "お"),
        ("rendered_sst2", 0, "negative"),
    ],
)
def test_spot_checks(task, index, name):
    classnames, _ = load_classnames_and_templates(task)
    assert classnames[index] == name


@pytest.mark.parametrize("task", ["sun397", "resisc45", "dtd"])
def test_alphabetical_tasks_are_sorted(task):
    # These datasets label their classes in alphabetical order of the class folders.
    classnames, _ = load_classnames_and_templates(task)
    assert classnames == sorted(classnames)


def test_exact_published_templates():
    assert load_classnames_and_templates("mnist")[1] == ['a photo of the number: "{}".']
    assert load_classnames_and_templates("svhn")[1] == ['a photo of the number: "{}".']
    assert load_classnames_and_templates("sun397")[1] == ["a photo of a {}.", "a photo of the {}."]
    assert load_classnames_and_templates("gtsrb")[1][0] == 'a zoomed in photo of a "{}" traffic sign.'
    assert load_classnames_and_templates("stanford_cars")[1][3] == "i love my {}!"
    assert load_classnames_and_templates("eurosat")[1][0] == "a centered satellite photo of {}."
    assert load_classnames_and_templates("resisc45")[1][-1] == "aerial view of the {}."
    assert load_classnames_and_templates("dtd")[1][0] == "a photo of a {} texture."
    assert load_classnames_and_templates("mnist")[1][0].format("3") == 'a photo of the number: "3".'


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("stanford-cars", "stanford_cars"),
        ("cars", "stanford_cars"),
        ("Cars", "stanford_cars"),
        ("SUN397", "sun397"),
        ("EuroSAT", "eurosat"),
        (" dtd ", "dtd"),
        ("svhn_cropped", "svhn"),
        ("tanganke/sun397", "sun397"),
        ("ufldl-stanford/svhn", "svhn"),
        ("ylecun/mnist", "mnist"),
        ("oxford-iiit-pet", "oxford_iiit_pet"),
        ("rendered-sst2", "rendered_sst2"),
        ("oxford-flowers102", "oxford_flowers102"),
        ("ethz/food101", "food101"),
        ("nateraw/rendered-sst2", "rendered_sst2"),
    ],
)
def test_aliases_resolve(alias, canonical):
    assert canonical_task_name(alias) == canonical
    assert load_classnames_and_templates(alias) == load_classnames_and_templates(canonical)


def test_every_alias_targets_a_task():
    assert set(ALIASES.values()) <= set(TALL20_TASK_NAMES)
    assert all(key == key.lower() and key not in TALL20_TASK_NAMES for key in ALIASES)
    for task in TALL20_TASK_NAMES:
        assert canonical_task_name(task) == task


def test_unknown_name_is_returned_unchanged():
    assert canonical_task_name("my_task") == "my_task"


def test_unknown_task_error_names_it_and_lists_known():
    with pytest.raises(UnknownNameError) as info:
        load_classnames_and_templates("imagenet")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "'imagenet'" in message
    for task in TALL20_TASK_NAMES:
        assert task in message


def test_results_are_fresh_copies():
    classnames, templates = load_classnames_and_templates("mnist")
    classnames.append("x")
    templates.clear()
    assert load_classnames_and_templates("mnist") == ([str(i) for i in range(10)], ['a photo of the number: "{}".'])
