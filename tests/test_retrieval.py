"""Image-text retrieval: recall at K both ways, COCO caption files, and a retrieval run end to end."""

import json

import pytest
import torch
from conftest import SHARED_DATA
from torchmetrics.retrieval import RetrievalHitRate

from vlm_adapt.data.captions import is_retrieval, read_coco_captions
from vlm_adapt.errors import ConfigError, DatasetNotFoundError
from vlm_adapt.metrics.retrieval import recall_sum_percent, recalls_from_features, retrieval_recalls
from vlm_adapt.train import train

COCO_MINI = {
    "name": "coco_captions",
    "layout": "coco_captions",
    "splits": {
        "train": {"annotations": "annotations/captions_train2017.json", "images": "train2017"},
        "val": {"annotations": "annotations/captions_val2017.json", "images": "val2017"},
    },
}


def known_case() -> tuple[torch.Tensor, torch.Tensor]:
    """12 images with 2 captions each (captions 2j, 2j+1 belong to image j).

    Own pairs score 1, unrelated pairs 0, and "distractor" pairs 2, which outrank the own pairs in
    both the distractor's row (image->text) and its column (text->image):
      rows 1-5 and 6 score caption 0 as a distractor; rows 7, 8, 9, 10, 11 score captions
      0..4, 0..5, 0..9, 0..10, 0..11.
    Image->text rank of each image's best caption: [0, 1, 1, 1, 1, 1, 1, 5, 6, 10, 11, 12]
      -> R@1 = 1/12, R@5 = 7/12, R@10 = 9/12.
    Text->image rank of each caption (rows scoring it 2): caption 0: 11; 1-4: 5; 5: 4; 6-9: 3;
      10: 2; 11: 1; 12-23: 0 -> R@1 = 12/24, R@5 = 19/24, R@10 = 23/24.
    """
    caption_image = torch.arange(24) // 2
    similarity = (caption_image[None, :] == torch.arange(12)[:, None]).float()
    for row in range(1, 7):
        similarity[row, 0] = 2.0
    for row, count in zip(range(7, 12), (5, 6, 10, 11, 12)):
        similarity[row, :count] = 2.0
    return similarity, caption_image


def test_recalls_of_a_hand_built_similarity_matrix():
    similarity, caption_image = known_case()
    recalls = retrieval_recalls(similarity, caption_image)
    expected = {
        "i2t/r1": 1 / 12, "i2t/r5": 7 / 12, "i2t/r10": 9 / 12,
        "t2i/r1": 12 / 24, "t2i/r5": 19 / 24, "t2i/r10": 23 / 24,
    }
    assert recalls == pytest.approx(expected)
    assert recall_sum_percent(recalls) == pytest.approx(100 * sum(expected.values()))


def test_recalls_match_torchmetrics_hit_rate_on_random_scores():
    generator = torch.Generator().manual_seed(0)
    num_images, per_image = 30, 5
    caption_image = torch.arange(num_images).repeat_interleave(per_image)
    similarity = torch.randn(num_images, num_images * per_image, generator=generator)
    relevant = caption_image[None, :] == torch.arange(num_images)[:, None]
    recalls = retrieval_recalls(similarity, caption_image)
    for k in (1, 5, 10):
        i2t = RetrievalHitRate(top_k=k)(
            similarity.flatten(), relevant.flatten(),
            indexes=torch.arange(num_images).repeat_interleave(len(caption_image)),
        )
        t2i = RetrievalHitRate(top_k=k)(
            similarity.t().flatten(), relevant.t().flatten(),
            indexes=torch.arange(len(caption_image)).repeat_interleave(num_images),
        )
        assert recalls[f"i2t/r{k}"] == pytest.approx(i2t.item())
        assert recalls[f"t2i/r{k}"] == pytest.approx(t2i.item())


def test_an_image_without_captions_is_an_error():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recalls(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_recalls_from_features_count_repeats_once_and_rank_only_the_encoded_part():
    similarity, caption_image = known_case()
    # features whose dot products are the similarity matrix: images one-hot, captions = columns
    image_features = torch.eye(12)
    caption_features = similarity.t().clone()
    direct = retrieval_recalls(similarity, caption_image)

    # a distributed sampler repeats samples: rows 0 and 5 appear twice
    image_rows = torch.tensor([*range(12), 0, 5])
    caption_rows = torch.tensor([*range(24), 3])
    repeated = recalls_from_features(
        image_rows, image_features[image_rows],
        caption_rows, caption_image[caption_rows], caption_features[caption_rows],
    )
    assert repeated == pytest.approx(direct)

    # captions 22 and 23 not encoded: image 11 has no caption left and leaves the ranking too
    partial = recalls_from_features(
        torch.arange(12), image_features, torch.arange(22), caption_image[:22], caption_features[:22]
    )
    assert partial == pytest.approx(retrieval_recalls(similarity[:11, :22], caption_image[:22]))


def test_read_coco_captions_on_the_shipped_coco_mini():
    train_split = read_coco_captions({**COCO_MINI, "root": str(SHARED_DATA / "coco-mini")}, "train")
    assert len(train_split.images) == 80 and len(train_split.captions) == 400
    assert torch.bincount(torch.tensor(train_split.caption_image)).tolist() == [5] * 80
    assert all((train_split.image_dir / name).is_file() for name in train_split.images)


def test_missing_caption_root_names_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.root="):
        read_coco_captions({**COCO_MINI, "root": str(tmp_path)}, "train")


def test_retrieval_protocol_and_caption_data_must_go_together():
    with pytest.raises(ConfigError, match="data=coco_captions"):
        is_retrieval({"name": "retrieval", "task": "retrieval"}, {"name": "imagenette", "layout": "coop"})
    with pytest.raises(ConfigError, match="protocol=retrieval"):
        is_retrieval({"name": "few_shot"}, COCO_MINI)


def test_unipt_retrieval_run_writes_recalls_to_metrics_json(make_cfg, tmp_path):
    cfg = make_cfg("method=unipt", "data=coco_captions", "protocol=retrieval", "method.batch_size=128")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["protocol"] == "retrieval"
    metrics = record["metrics"]
    keys = [f"test/{d}/r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert all(0.0 <= metrics[key] <= 100.0 for key in keys)
    assert metrics["test/i2t/r1"] <= metrics["test/i2t/r5"] <= metrics["test/i2t/r10"]
    assert metrics["test/rsum"] == pytest.approx(sum(metrics[key] for key in keys), abs=1e-2)
    assert record["cost"]["train_steps"] == 4  # 400 captions in batches of 128


def test_a_method_without_retrieval_mode_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="method=unipt"):
        train(make_cfg("method=coop", "data=coco_captions", "protocol=retrieval"))


@pytest.mark.parametrize("method", ["zero_shot", "ft"])
def test_zero_shot_and_full_fine_tuning_retrieval_baselines(make_cfg, tmp_path, method):
    train(make_cfg(f"method={method}", "data=coco_captions", "protocol=retrieval", "method.batch_size=64",
                   "trainer.limit_train_batches=2"))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["method"] == method and record["status"] == "completed"
    assert 0.0 < record["metrics"]["test/i2t/r10"] <= 100.0 and 0.0 < record["metrics"]["test/t2i/r10"] <= 100.0
    assert record["cost"]["train_steps"] == (0 if method == "zero_shot" else 2)
