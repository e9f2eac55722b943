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
    first = load_or_sample_few_shot(imagenette.train, 2, 3, tmp_path, "train")
    (saved,) = tmp_path.glob("train_*.json")
    assert json.loads(saved.read_text())["items"][0] == [first[0].path, first[0].label, first[0].classname]
    # the same pool in another order is the same split: the saved sample is reused, not redrawn
    other = sample_few_shot(imagenette.train, 2, seed=4)
    saved.write_text(json.dumps({"pool": json.loads(saved.read_text())["pool"],
                                 "items": [[i.path, i.label, i.classname] for i in other]}))
    assert load_or_sample_few_shot(imagenette.train[::-1], 2, 3, tmp_path, "train") == other != first


def test_few_shot_sample_follows_the_split_not_the_dataset_name(imagenette, tmp_path):
    """Another copy or version of a dataset with the same name never reuses the first one's sample."""
    first = load_or_sample_few_shot(imagenette.train, 2, 3, tmp_path, "train")
    other = [Item("elsewhere/" + i.path, i.label, i.classname) for i in imagenette.train]
    second = load_or_sample_few_shot(other, 2, 3, tmp_path, "train")
    assert all(item.path.startswith("elsewhere/") for item in second)
    assert len(list(tmp_path.glob("train_*.json"))) == 2
    # the first copy still gets its own sample back
    assert load_or_sample_few_shot(imagenette.train, 2, 3, tmp_path, "train") == first


def test_stale_or_corrupt_saved_sample_is_never_used(imagenette, tmp_path):
    first = load_or_sample_few_shot(imagenette.train, 2, 3, tmp_path, "train")
    (saved,) = tmp_path.glob("train_*.json")
    record = json.loads(saved.read_text())
    record["items"][0][0] = "images/not-in-this-split.JPEG"  # a sample that does not belong to the pool
    saved.write_text(json.dumps(record))
    assert load_or_sample_few_shot(imagenette.train, 2, 3, tmp_path, "train") == first
    saved.write_text("{truncated")
    assert load_or_sample_few_shot(imagenette.train, 2, 3, tmp_path, "train") == first
    assert json.loads(saved.read_text())["items"][0][0] == first[0].path  # rewritten whole


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


@pytest.mark.parametrize("drop_last, batch_size, expected", [(False, 8, [8, 8, 4]), (True, 8, [8, 8]),
                                                             (True, 32, [20])])
def test_drop_last_follows_dassls_rule(drop_last, batch_size, expected):
    """Dassl drops the last partial batch only when the training set holds a full one."""
    dm = ClassificationDataModule(IMAGENETTE, {"name": "few_shot", "shots": 2}, seed=1, batch_size=batch_size,
                                  drop_last=drop_last)
    dm.set_preprocessing({"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    assert [len(labels) for _, labels in dm.train_dataloader()] == expected
