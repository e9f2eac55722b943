"""Dataset reading, few-shot sampling, base/new splits and the datamodule on the shipped images."""

import json
import shutil

import pytest
from conftest import SHARED_DATA

from vlm_adapt.data.base_new import select_classes, subset_labels
from vlm_adapt.data.datamodule import ClassificationDataModule
from vlm_adapt.data.datasets import ImageListDataset
from vlm_adapt.data.few_shot import load_or_sample_few_shot, sample_few_shot
from vlm_adapt.data.splits import Item, read_coop_split, read_image_folder
from vlm_adapt.errors import CorruptImageError, DatasetNotFoundError

IMAGENETTE = dict(name="imagenette", layout="coop", root=str(SHARED_DATA / "imagenette"),
                  split_file="split_zhou_Imagenette.json", image_dir=".", templates=["a photo of a {}."])


@pytest.fixture(scope="module")
def imagenette():
    return read_coop_split("imagenette", SHARED_DATA / "imagenette", "split_zhou_Imagenette.json", ".")


def test_coop_split_reads_classnames_by_label(imagenette):
    assert len(imagenette.classnames) == 10
    assert imagenette.classnames[0] == "tench"
    assert (len(imagenette.train), len(imagenette.val), len(imagenette.test)) == (640, 160, 1000)
    assert (imagenette.image_dir / imagenette.train[0].path).is_file()


def test_few_shot_is_deterministic_per_seed(imagenette):
    a, b = sample_few_shot(imagenette.train, 4, seed=1), sample_few_shot(imagenette.train, 4, seed=1)
    c = sample_few_shot(imagenette.train, 4, seed=2)
    assert a == b
    assert a != c
    assert all(sum(i.label == label for i in a) == 4 for label in range(10))


def test_few_shot_sample_is_saved_and_reused(imagenette, tmp_path):
    cache = tmp_path / "sample.json"
    first = load_or_sample_few_shot(imagenette.train, 2, 3, cache)
    assert json.loads(cache.read_text())[0] == [first[0].path, first[0].label, first[0].classname]
    # a saved sample wins over a fresh draw, so every run with this seed sees the same images
    assert load_or_sample_few_shot(imagenette.train[::-1], 2, 3, cache) == first


def test_base_and_new_classes_are_disjoint_and_relabelled(imagenette):
    base, new = subset_labels(10, "base"), subset_labels(10, "new")
    assert base == [0, 1, 2, 3, 4] and new == [5, 6, 7, 8, 9]
    assert subset_labels(11, "base") == list(range(6))  # ceil(C/2)
    new_items = select_classes(imagenette.test, new)
    assert {i.label for i in new_items} == set(range(5))
    assert {i.classname for i in new_items}.isdisjoint({i.classname for i in select_classes(imagenette.test, base)})


def test_base2new_datamodule_label_spaces():
    dm = ClassificationDataModule(IMAGENETTE, {"name": "base2new", "shots": 2, "train_subset": "base",
                                               "test_subsets": ["base", "new"]}, seed=1, batch_size=4)
    names = [space.name for space in dm.test_label_spaces]
    assert names == ["base", "new"]
    assert dm.train_label_space.classnames == dm.test_label_spaces[0].classnames
    assert set(dm.test_label_spaces[0].classnames).isdisjoint(dm.test_label_spaces[1].classnames)
    assert len(dm.train_items) == 5 * 2 and {i.label for i in dm.train_items} == set(range(5))


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.root=.*expected layout"):
        read_coop_split("pets", tmp_path / "nowhere", "split_zhou_OxfordPets.json")


def test_missing_split_file_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="split file .* not found"):
        read_coop_split("pets", tmp_path, "split_zhou_OxfordPets.json")


def test_corrupt_image_is_reported_by_path(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    dataset = ImageListDataset([Item("bad.jpg", 0, "x")], tmp_path, transform=None)
    with pytest.raises(CorruptImageError, match=str(tmp_path / "bad.jpg")):
        dataset[0]


def test_image_folder_with_classnames_file(tmp_path):
    for wnid in ("n01440764", "n02102040"):
        (tmp_path / "images" / wnid).mkdir(parents=True)
        for k in range(10):
            source = next((SHARED_DATA / "imagenette/images" / wnid).glob("*.jpg"))
            shutil.copy(source, tmp_path / f"images/{wnid}/{k}.jpg")
    (tmp_path / "classnames.txt").write_text("n01440764 tench\nn02102040 English springer\n")
    splits = read_image_folder("mine", tmp_path)
    assert splits.classnames == ["tench", "English springer"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 6)


def test_imagenet_samples_has_1000_classes():
    splits = read_image_folder("imagenet_samples", SHARED_DATA / "imagenet-samples",
                               split_dirs={"test": "."})
    assert len(splits.classnames) == 1000 and len(splits.test) == 1000
