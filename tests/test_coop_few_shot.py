"""CoOp's own few-shot pickles: read image for image, safely, and checked against the split."""

import pickle
import shutil
import sys
import types

import pytest
from conftest import SHARED_DATA

from vlm_adapt.data.datamodule import ClassificationDataModule
from vlm_adapt.errors import DatasetNotFoundError


@pytest.fixture
def dassl_datum(monkeypatch):
    """A `dassl.data.datasets.base_dataset.Datum` class, as CoOp pickles it (no Dassl installed here)."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return Datum


@pytest.fixture
def imagenette_copy(tmp_path):
    root = tmp_path / "imagenette"
    root.mkdir()
    (root / "split_zhou_Imagenette.json").symlink_to(SHARED_DATA / "imagenette" / "split_zhou_Imagenette.json")
    (root / "images").symlink_to(SHARED_DATA / "imagenette" / "images")
    return root


def datamodule(root, protocol=None, **data):
    cfg = dict(name="imagenette", layout="coop", root=str(root), split_file="split_zhou_Imagenette.json",
               image_dir=".", templates=["a photo of a {}."], **data)
    return ClassificationDataModule(cfg, protocol or {"name": "few_shot", "shots": 2}, seed=1, batch_size=4)


def write_coop_pickle(root, datum_cls, train, val, shots=2, seed=1):
    folder = root / "split_fewshot"
    folder.mkdir(exist_ok=True)
    as_datum = [[datum_cls(f"/home/someone/data/imagenette/{i.path}", i.label, i.classname) for i in items]
                for items in (train, val)]
    with open(folder / f"shot_{shots}-seed_{seed}.pkl", "wb") as handle:
        pickle.dump({"train": as_datum[0], "val": as_datum[1]}, handle)
    return folder / f"shot_{shots}-seed_{seed}.pkl"


def test_coop_file_under_the_root_is_used_image_for_image(imagenette_copy, dassl_datum):
    plain = datamodule(imagenette_copy)
    assert plain.few_shot_source == "sampled"
    # CoOp's own choice: the last two training images of each class (not what our sampler picks)
    train = [i for label in range(10) for i in [x for x in plain.splits.train if x.label == label][-2:]]
    val = [i for label in range(10) for i in [x for x in plain.splits.val if x.label == label][:2]]
    path = write_coop_pickle(imagenette_copy, dassl_datum, train, val)
    dm = datamodule(imagenette_copy)
    assert dm.train_items == train and dm.val_items == val
    assert dm.few_shot_source == str(path)
    # base-to-new: CoOp samples over all classes, then keeps the base half (relabelled from 0)
    b2n = datamodule(imagenette_copy, {"name": "base2new", "shots": 2, "train_subset": "base",
                                       "test_subsets": ["base", "new"]})
    assert [i.path for i in b2n.train_items] == [i.path for i in train if i.label < 5]


def test_explicit_few_shot_file_and_its_errors(imagenette_copy, dassl_datum, tmp_path):
    plain = datamodule(imagenette_copy)
    path = write_coop_pickle(imagenette_copy, dassl_datum, plain.splits.train[:3], plain.splits.val[:1])
    moved = tmp_path / "mine.pkl"
    shutil.move(path, moved)
    assert datamodule(imagenette_copy).few_shot_source == "sampled"
    assert datamodule(imagenette_copy, few_shot_file=str(moved)).train_items == plain.splits.train[:3]
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        datamodule(imagenette_copy, few_shot_file=str(tmp_path / "none.pkl"))
    stale = imagenette_copy / "split_fewshot" / "shot_2-seed_1.pkl"
    with open(stale, "wb") as handle:
        pickle.dump({"train": [dassl_datum("/x/images/n000/not_here.JPEG", 0, "tench")], "val": []}, handle)
    with pytest.raises(DatasetNotFoundError, match="not in the split.*another version"):
        datamodule(imagenette_copy)


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_crafted_pickle_runs_nothing(imagenette_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (imagenette_copy / "split_fewshot").mkdir()
    with open(imagenette_copy / "split_fewshot" / "shot_2-seed_1.pkl", "wb") as handle:
        pickle.dump({"train": [Exploit()]}, handle)
    with pytest.raises(DatasetNotFoundError, match="refusing to load posix.system"):
        datamodule(imagenette_copy)
    assert not (tmp_path / "pwned").exists()
