"""Input is validated once, where it is read: splits, shots, loader settings, roots and sample files.

Each bad input fails with one DatasetNotFoundError or ConfigError that names the key or file to fix and
lists every problem found (at most 10 examples per kind, with counts). The datasets are built in tmp_path
from the shipped Imagenette images (links, never copies).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import SHARED_DATA

import vlm_adapt.config  # noqa: F401  (registers the resolvers the composed config uses)
from vlm_adapt.build import build_datamodule
from vlm_adapt.data.datamodule import ClassificationDataModule
from vlm_adapt.data.few_shot import load_or_sample_few_shot
from vlm_adapt.data.splits import read_coop_split, read_image_folder
from vlm_adapt.errors import ConfigError, DatasetNotFoundError

IMAGENETTE = SHARED_DATA / "imagenette"
SPLIT = json.loads((IMAGENETTE / "split_zhou_Imagenette.json").read_text())
NAMES = ["tench", "English springer", "cassette player", "chain saw"]
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684"]
FEW_SHOT = {"name": "few_shot", "shots": 2}


def entries(split: str, label: int, count: int) -> list[list]:
    """The first `count` entries of `label` in the shipped split."""
    return [entry for entry in SPLIT[split] if entry[1] == label][:count]


def coop_root(tmp_path: Path, train: list, val: list | None = None, test: list | None = None) -> Path:
    """A CoOp-layout root: the shipped images (a link) and a split file of the given entries."""
    root = tmp_path / "mini"
    root.mkdir(exist_ok=True)
    if not (root / "images").exists():
        (root / "images").symlink_to(IMAGENETTE / "images")
    split = {"train": train, "val": val or [], "test": test if test is not None else train}
    (root / "split_zhou_Mini.json").write_text(json.dumps(split))
    return root


def coop_cfg(root: Path, **data) -> dict:
    return dict(name="mini", layout="coop", root=str(root), split_file="split_zhou_Mini.json", image_dir=".",
                templates=["a photo of a {}."], **data)


def datamodule(cfg: dict, protocol: dict | None = None, **kwargs) -> ClassificationDataModule:
    return ClassificationDataModule(cfg, protocol or FEW_SHOT, **{"seed": 1, "batch_size": 4, **kwargs})


def uneven_root(tmp_path: Path, train_per_class: tuple[int, ...]) -> Path:
    """Class k has train_per_class[k] training images and 2 test images."""
    train = [e for label, n in enumerate(train_per_class) for e in entries("train", label, n)]
    test = [e for label in range(len(train_per_class)) for e in entries("test", label, 2)]
    return coop_root(tmp_path, train, test=test)


# ---------------------------------------------------------------- splits
def test_every_split_problem_is_listed_in_one_error(tmp_path):
    train = entries("train", 0, 3) + entries("train", 1, 3) + entries("train", 3, 3)  # class 2: no training image
    train[3] = [train[3][0], 1, "tench"]  # label 1 under another name
    train.append([train[0][0], 7, "chain saw"])  # label 7 of 4 class names: a phantom class
    train.append(["images/n01440764/not_here.jpg", 0, "tench"])
    root = coop_root(tmp_path, train, test=train[:3] + entries("test", 2, 2))
    with pytest.raises(DatasetNotFoundError) as caught:
        read_coop_split("mini", root, "split_zhou_Mini.json", ".")
    message = str(caught.value)
    assert str(root / "split_zhou_Mini.json") in message and "data.root" in message
    assert "1 labels outside 0..3 (4 class names): train[9] 'images/n01440764/" in message
    assert "label 7 'chain saw'" in message
    assert "1 entries whose class name differs from their label's: train[3]" in message
    assert "label 1 is 'tench', elsewhere 'English springer'" in message
    assert "1 classes without a training image: 2 'cassette player'" in message
    assert "1 image files missing under" in message and "images/n01440764/not_here.jpg" in message


def test_a_long_listing_is_capped_with_its_count(tmp_path):
    train = entries("train", 0, 2) + [[f"images/n01440764/gone_{k}.jpg", 0, "tench"] for k in range(25)]
    root = coop_root(tmp_path, train, test=entries("test", 0, 2))
    with pytest.raises(DatasetNotFoundError, match=r"25 image files missing .*\(and 15 more\)") as caught:
        read_coop_split("mini", root, "split_zhou_Mini.json", ".")
    assert str(caught.value).count("gone_") == 10


def test_a_wrong_image_dir_is_one_problem_not_every_file(tmp_path):
    root = coop_root(tmp_path, entries("train", 0, 3))
    with pytest.raises(DatasetNotFoundError, match=r"image folder missing: .*nowhere does not exist \(data.image_dir"):
        read_coop_split("mini", root, "split_zhou_Mini.json", "nowhere")


def test_malformed_entries_are_listed_with_the_other_problems(tmp_path):
    good = entries("train", 0, 2)
    bad = [[good[0][0], "0", "tench"], [good[0][0], 1.5, "tench"], [good[0][0], 0], "images/x.jpg"]
    gone = [["images/n01440764/gone.jpg", 0, "tench"]]
    with pytest.raises(DatasetNotFoundError) as caught:
        read_coop_split("mini", coop_root(tmp_path, good + bad + gone, test=good), "split_zhou_Mini.json", ".")
    message = str(caught.value)
    assert "4 entries that are not [relative_path, integer label, classname]" in message
    assert all(f"train[{index}]" in message for index in (2, 3, 4, 5))
    assert "1 image files missing under" in message and "gone.jpg" in message


def test_image_folder_classes_without_training_images_are_listed(tmp_path):
    for wnid, count in zip(WNIDS[:3], (4, 1, 0)):  # 1 image: none in the 50% train share; 0: no folder
        if count:
            (tmp_path / "images" / wnid).mkdir(parents=True)
        for path in sorted((IMAGENETTE / "images" / wnid).glob("*.jpg"))[:count]:
            (tmp_path / "images" / wnid / path.name).symlink_to(path)
    (tmp_path / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))
    (tmp_path / "images" / WNIDS[3]).mkdir()
    with pytest.raises(DatasetNotFoundError) as caught:
        read_image_folder("mine", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "classnames.txt") in message
    assert ("3 classes without a training image: 1 'English springer'; 2 'cassette player'; 3 'chain saw'"
            in message)
    assert "remove the class from" in message


# ---------------------------------------------------------------- shots
@pytest.mark.parametrize("shots", [0, -4, 2.5, True, "4"])
def test_shots_must_be_a_positive_integer_or_null(tmp_path, shots):
    root = uneven_root(tmp_path, (3, 3))
    with pytest.raises(ConfigError, match=r"protocol.shots=.* positive integer .*protocol.shots=null"):
        datamodule(coop_cfg(root), {"name": "few_shot", "shots": shots})


def test_shots_above_a_class_size_train_on_what_exists_and_are_recorded(tmp_path, caplog):
    root = uneven_root(tmp_path, (3, 6, 5))
    with caplog.at_level(logging.WARNING, logger="vlm_adapt.data.datamodule"):
        dm = datamodule(coop_cfg(root), {"name": "few_shot", "shots": 5})
    record = dm.few_shot_record
    assert json.loads(json.dumps(record)) == record
    assert record | {"images": None} == {"source": "sampled", "requested": 5, "classes": 3, "images": None,
                                         "per_class_min": 3, "per_class_max": 5, "classes_short": 1}
    assert record["images"] == len(dm.train_items) == 3 + 5 + 5
    assert dm.few_shot_source == "sampled"
    assert "protocol.shots=5: 1 of 3 training classes have fewer images" in caplog.text
    assert "'tench' (3)" in caplog.text


def test_all_images_are_recorded_as_such(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_adapt.data.datamodule"):
        dm = datamodule(coop_cfg(uneven_root(tmp_path, (3, 6))), {"name": "few_shot", "shots": None})
    assert dm.few_shot_source == "all"
    assert dm.few_shot_record == {"source": "all", "requested": None, "classes": 2, "images": 9,
                                  "per_class_min": 3, "per_class_max": 6, "classes_short": 0}
    assert "fewer images" not in caplog.text


# ---------------------------------------------------------------- loader settings and subsets
def test_loader_settings_name_every_bad_key_at_once(tmp_path):
    root = uneven_root(tmp_path, (2, 2))
    with pytest.raises(ConfigError) as caught:
        datamodule(coop_cfg(root), batch_size=0, eval_batch_size=-1, num_workers=-2)
    message = str(caught.value)
    for expected in ("method.batch_size=0", "loader.eval_batch_size=-1", "loader.num_workers=-2"):
        assert expected in message


def test_batch_size_from_the_real_config_names_its_key(make_cfg):
    with pytest.raises(ConfigError, match=r"method.batch_size=-8: use a positive integer"):
        build_datamodule(make_cfg("method.batch_size=-8"))


def test_a_subset_that_selects_no_class_names_its_key(tmp_path):
    cfg = coop_cfg(uneven_root(tmp_path, (3,)))  # one class: base = [0], new = []
    with pytest.raises(ConfigError, match=r"protocol.train_subset: 'new' selects no class of data=mini \(1 classes"):
        datamodule(cfg, {"name": "base2new", "shots": 2, "train_subset": "new"})
    with pytest.raises(ConfigError, match=r"protocol.test_subsets: 'new' selects no class"):
        datamodule(cfg, {"name": "base2new", "shots": 2, "train_subset": "base", "test_subsets": ["base", "new"]})
    with pytest.raises(ConfigError, match=r"protocol.train_subset: 'half' is not a class subset; use one of all"):
        datamodule(cfg, {"name": "base2new", "shots": 2, "train_subset": "half"})


def test_an_empty_test_set_is_refused(tmp_path):
    root = coop_root(tmp_path, entries("train", 0, 2) + entries("train", 1, 2), test=entries("test", 0, 2))
    with pytest.raises(DatasetNotFoundError, match=r"Test sets \[.new.\] of this run have no images: give data=mini"):
        datamodule(coop_cfg(root), {"name": "base2new", "shots": 2, "train_subset": "base",
                                    "test_subsets": ["base", "new"]})


def test_a_test_only_dataset_cannot_train_but_can_be_evaluated(make_cfg):
    dm = build_datamodule(make_cfg("data=imagenet_samples"))  # zero-shot runs need no training images
    assert dm.few_shot_record["images"] == 0
    dm.set_preprocessing({"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    with pytest.raises(DatasetNotFoundError, match=r"data=imagenet_samples has no training images .*method=zero_shot"):
        dm.train_dataloader()


# ---------------------------------------------------------------- roots
def test_image_folder_without_a_root_says_how_to_set_it(make_cfg):
    with pytest.raises(ConfigError) as caught:
        build_datamodule(make_cfg("data=image_folder"))
    assert str(caught.value) == (
        "data=image_folder needs data.root=/path/to/folder (with images/<class>/... and classnames.txt)."
    )


def test_a_missing_root_names_its_key(make_cfg, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"data.root={re.escape(str(tmp_path))}/gone does not exist\. Set"):
        build_datamodule(make_cfg("data=imagenette", f"data.root={tmp_path}/gone"))
    with pytest.raises(DatasetNotFoundError, match=r"protocol.targets.caltech101.root=.* does not exist"):
        build_datamodule(make_cfg("protocol=cross_dataset", "data=imagenette"))  # no caltech-101 shipped


def test_the_cli_without_data_root_exits_with_the_message(tmp_path):
    script = Path(sys.executable).parent / "vlm-adapt"
    env = {**os.environ, "VLM_ADAPT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [str(script), "train", "backbone=tiny", "data=image_folder", "trainer.accelerator=cpu", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode != 0
    assert "data=image_folder needs data.root=/path/to/folder (with images/<class>/... and classnames.txt)" in (
        result.stderr)


# ---------------------------------------------------------------- saved and CoOp few-shot samples
def test_a_corrupt_sample_cache_is_moved_aside_and_drawn_again(tmp_path, caplog):
    split = read_coop_split("imagenette", IMAGENETTE, "split_zhou_Imagenette.json", ".")
    first = load_or_sample_few_shot(split.train, 2, 3, tmp_path, "train")
    (saved,) = tmp_path.glob("train_*.json")
    saved.write_text('{"pool": "x", "items": [["a.jpg", 0]]}')  # readable JSON, broken entries
    with caplog.at_level(logging.WARNING, logger="vlm_adapt.data.few_shot"):
        again = load_or_sample_few_shot(split.train, 2, 3, tmp_path, "train")
    assert again == first  # the same seed draws the same images: the result does not change
    assert f"Few-shot sample {saved} is corrupt" in caplog.text and f"moved to {saved}.corrupt" in caplog.text
    assert json.loads(Path(f"{saved}.corrupt").read_text())["pool"] == "x"
    assert json.loads(saved.read_text())["items"][0][0] == first[0].path


@pytest.mark.parametrize("content", [b"not a pickle", pickle.dumps({"train": [1, 2]}), pickle.dumps([1])[:-3]])
def test_a_corrupt_coop_pickle_names_the_file_and_how_to_stop_using_it(tmp_path, content):
    root = uneven_root(tmp_path, (3, 3))
    explicit = tmp_path / "mine.pkl"
    explicit.write_bytes(content)
    with pytest.raises(DatasetNotFoundError, match=rf"data.few_shot_file={re.escape(str(explicit))} is not a CoOp "
                       "few-shot file.*set data.few_shot_file=null"):
        datamodule(coop_cfg(root, few_shot_file=str(explicit)))
    implicit = root / "split_fewshot" / "shot_2-seed_1.pkl"
    implicit.parent.mkdir()
    implicit.write_bytes(content)
    with pytest.raises(DatasetNotFoundError, match=rf"{re.escape(str(implicit))} \(CoOp's few-shot file, found under "
                       rf"data.root.*move it out of {re.escape(str(implicit.parent))}"):
        datamodule(coop_cfg(root))


@pytest.fixture
def dassl_datum(monkeypatch):
    """A `dassl.data.datasets.base_dataset.Datum` class as CoOp pickles it (Dassl is not installed)."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath: str, label: int):
            self._impath, self._label = impath, label

    Datum.__module__, Datum.__qualname__, module.Datum = module.__name__, "Datum", Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    return Datum


def test_every_mismatch_of_a_coop_pickle_is_listed(tmp_path, dassl_datum):
    root = uneven_root(tmp_path, (3, 3))
    (root / "split_fewshot").mkdir()
    train = [dassl_datum(f"/elsewhere/{e[0]}", e[1]) for e in entries("train", 0, 2) + entries("train", 1, 2)]
    train[0] = dassl_datum("/elsewhere/images/n01440764/not_here.jpg", 0)
    train[1] = dassl_datum("/elsewhere/images/n01440764/other.jpg", 0)
    train[2]._label = 0  # a class-1 image under label 0
    (root / "split_fewshot" / "shot_2-seed_1.pkl").write_bytes(pickle.dumps({"train": train}))
    with pytest.raises(DatasetNotFoundError) as caught:
        datamodule(coop_cfg(root))
    message = str(caught.value)
    assert "2 images not in the split" in message and "not_here.jpg" in message and "other.jpg" in message
    assert "1 images with another label in the split" in message and "is label 1 in the split, 0 here" in message
