"""The shared cache service: rows per training image in dataset order, seeded views, once vs per epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from vlm_adapt.data.sample_cache import CacheRequest, SampleCaches
from vlm_adapt.errors import ConfigError


class NoisyImages(Dataset):
    """Image i is i + noise drawn from the global generator, as an augmentation draws its randomness."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return torch.full((3, 2, 2), float(index)) + torch.rand(()), index % 3


class Source:
    seed, num_workers = 7, 0

    def __init__(self, n: int = 10):
        self.n, self.transforms = n, []

    def train_dataset(self, transform=None):
        self.transforms.append(transform)
        return NoisyImages(self.n)


def mean_pixel(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def caches(*requests: CacheRequest, source: Source | None = None) -> SampleCaches:
    service = SampleCaches(list(requests), {r.name: r.refresh for r in requests})
    service.bind(source or Source())
    return service


CPU = torch.device("cpu")


def test_rows_follow_dataset_order_and_an_index_reads_its_own_rows():
    service = caches(CacheRequest("x", mean_pixel, "once", stream=0, batch_size=3))
    built = service.get("x", CPU)
    assert built.values.shape == (10,) and built.labels.tolist() == [i % 3 for i in range(10)]
    assert torch.all((built.values - torch.arange(10)).abs() < 1)  # image i's row, noise below 1
    index = torch.tensor([4, 0, 4])
    assert torch.equal(service.rows("x", index, CPU), built.values[index])


def test_a_once_cache_is_kept_and_an_epoch_cache_is_rebuilt_per_epoch_from_seeded_views():
    service = caches(CacheRequest("once", mean_pixel, "once", stream=0),
                     CacheRequest("epoch", mean_pixel, "epoch", stream=100))
    first = service.get("once", CPU)
    assert service.get("once", CPU, epoch=3) is first
    epoch0 = service.get("epoch", CPU, epoch=0).values
    epoch1 = service.get("epoch", CPU, epoch=1).values
    assert service.get("epoch", CPU, epoch=1).values is epoch1  # built once per epoch
    assert not torch.equal(epoch0, epoch1)  # a fresh augmentation every epoch
    state = torch.random.get_rng_state()
    again = caches(CacheRequest("epoch", mean_pixel, "epoch", stream=100)).get("epoch", CPU, epoch=1).values
    assert torch.equal(again, epoch1)  # (seed, stream, epoch) alone decide a view: every rank, every resume
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random stream is untouched
    assert service.per_epoch() == ["epoch"]


def test_views_are_averaged_in_float32_each_from_its_own_seed():
    single = [caches(CacheRequest("v", mean_pixel, "once", stream=s)).get("v", CPU).values for s in (0, 1, 2)]
    averaged = caches(CacheRequest("v", mean_pixel, "once", stream=0, views=3)).get("v", CPU).values
    torch.testing.assert_close(averaged, sum(single) / 3)
    assert averaged.dtype == torch.float32


def test_the_requested_transform_and_storage_are_used():
    source = Source()
    transform = object()
    service = caches(CacheRequest("x", mean_pixel, "once", stream=0, transform=transform, dtype=torch.float64),
                     source=source)
    assert service.get("x", CPU).values.dtype == torch.float64
    assert source.transforms[-1] is transform


def test_release_frees_rows_and_an_undeclared_request_or_no_datamodule_is_refused():
    service = caches(CacheRequest("x", mean_pixel, "epoch", stream=0))
    service.get("x", CPU)
    service.release()
    assert service.built("x") is None
    with pytest.raises(TypeError, match="not declared"):
        SampleCaches([CacheRequest("x", mean_pixel, "epoch", stream=0)], {"x": "once"})
    with pytest.raises(ConfigError, match="ClassificationDataModule"):
        SampleCaches([], {}).bind(object(), method_name="method=skip_tuning")


def test_every_named_cache_a_method_declares_has_its_request(make_cfg):
    from conftest import tiny_method_overrides

    from vlm_adapt.build import build_backbone, build_method
    from vlm_adapt.methods.registry import registered_methods

    for name, spec in registered_methods().items():
        declared = {cache.name: cache.refresh for cache in spec.caches if cache.name}
        if not declared:
            continue
        cfg = make_cfg(*tiny_method_overrides(name))
        model = build_method(cfg.method.module, build_backbone(cfg))
        assert {r.name: r.refresh for r in model.cache_requests()} == declared, name
        assert bool(model.sample_caches)
