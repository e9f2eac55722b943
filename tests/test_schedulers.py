"""Learning-rate schedules: Dassl's warm-up + cosine exactly, ours as an option, CLIP4Clip's per step."""

import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.param_groups import build_param_groups
from vlm_adapt.methods.schedulers import build_scheduler


def sgd(*lrs):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=lrs[0])


def epoch_rates(optimizer, scheduler, epochs):
    rates = []
    for _ in range(epochs):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def dassl_reference_rates(lrs, max_epoch, warmup, cons_lr):
    """Dassl's ConstantWarmupScheduler as Dassl steps it: the successor CosineAnnealingLR(T_max=max_epoch)
    is built before training and stepped only once the wrapper's epoch count has reached the warm-up."""
    optimizer = sgd(*lrs)
    successor = CosineAnnealingLR(optimizer, T_max=float(max_epoch))
    last_epoch, rates = 0, []
    for _ in range(max_epoch):
        rates.append([cons_lr] * len(lrs) if last_epoch < warmup else successor.get_last_lr())
        optimizer.step()
        if last_epoch >= warmup:
            successor.step()
        else:
            last_epoch += 1
    return rates


@pytest.mark.parametrize("epochs, warmup", [(5, 1), (10, 1), (20, 1), (50, 1), (40, 0), (8, 2)])
def test_dassl_cosine_matches_dassls_scheduler_per_epoch(epochs, warmup):
    optimizer = sgd(2e-5, 5e-6)  # Skip Tuning's two groups: the warm-up rate is absolute for both
    scheduler = build_scheduler(optimizer, {"name": "dassl_cosine", "warmup": warmup, "warmup_lr": 1e-6}, epochs)
    ours = epoch_rates(optimizer, scheduler, epochs)
    reference = dassl_reference_rates([2e-5, 5e-6], epochs, warmup, 1e-6)
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64),
                               rtol=1e-9, atol=1e-15)


def test_dassl_cosine_closed_form_and_never_zero():
    optimizer = sgd(2e-3)
    scheduler = build_scheduler(optimizer, {"name": "dassl_cosine", "warmup": 1, "warmup_lr": 1e-5}, 5)
    rates = [r[0] for r in epoch_rates(optimizer, scheduler, 5)]
    expected = [1e-5] + [2e-3 * (1 + math.cos(math.pi * j / 5)) / 2 for j in range(4)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[-1] > 0.3 * 2e-3  # Dassl's last epoch is far from zero (cos(3 pi / 5))


def test_own_cosine_anneals_to_zero_and_differs_by_about_14_percent_at_5_epochs():
    totals = {}
    for name in ("cosine", "dassl_cosine"):
        optimizer = sgd(2e-5)
        scheduler = build_scheduler(optimizer, {"name": name, "warmup": 1, "warmup_lr": 1e-6}, 5)
        rates = [r[0] for r in epoch_rates(optimizer, scheduler, 5)]
        totals[name] = sum(rates)
        if name == "cosine":
            assert rates[-1] == pytest.approx(2e-5 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    assert totals["dassl_cosine"] / totals["cosine"] == pytest.approx(1.14, abs=0.02)


def test_clip4clip_warmup_cosine_per_step():
    optimizer = sgd(1e-4)
    scheduler = build_scheduler(optimizer, {"name": "clip4clip", "warmup_proportion": 0.1}, 100)
    rates = [r[0] for r in epoch_rates(optimizer, scheduler, 100)]
    assert rates[5] == pytest.approx(1e-4 * 0.05 / 0.1)
    assert rates[50] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ConfigError, match="dassl_cosine, cosine, clip4clip, none"):
        build_scheduler(sgd(1.0), {"name": "step"}, 10)


def test_param_groups_by_prefix_and_no_decay_names():
    model = torch.nn.ModuleDict({"visual": torch.nn.Linear(2, 2), "text": torch.nn.Linear(2, 2)})
    named = list(model.named_parameters())
    groups = build_param_groups(named, {"image": {"prefixes": ["visual."], "lr": 5e-6}}, ["bias"])
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"image", "image/no_decay", "default", "default/no_decay"}
    assert by_name["image"]["params"][0] is model["visual"].weight and by_name["image"]["lr"] == 5e-6
    assert by_name["default/no_decay"]["weight_decay"] == 0.0 and "lr" not in by_name["default"]
    optimizer = torch.optim.SGD(groups, lr=2e-5, weight_decay=5e-4)
    assert [g["lr"] for g in optimizer.param_groups if g["name"].startswith("image")] == [5e-6, 5e-6]
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.0, 5e-4, 5e-4]
    with pytest.raises(ConfigError, match="prefixes"):
        build_param_groups(named, {"image": {"lr": 1.0}})
