"""Mean and spread over seeds, and averages over datasets that never mix in partial seeds."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    """Values of one table cell (one per run or per seed): mean and population std (Dassl's np.std)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        return cls(tuple(float(v) for v in values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values) if self.n > 1 else 0.0


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


SeedValues = dict[int, list[float]]  # seed -> the values of that seed's runs (one, unless repeated)


def per_seed_means(by_seed: SeedValues) -> dict[int, float]:
    return {seed: statistics.fmean(values) for seed, values in by_seed.items() if values}


@dataclass(frozen=True)
class DatasetAverage:
    """An average over datasets computed per seed, over the seeds every dataset has."""

    stat: Stat
    seeds: tuple[int, ...]
    dropped: dict[str, tuple[int, ...]]  # dataset -> its seeds left out because another dataset lacks them


def average_over_datasets(
    per_dataset: dict[str, dict[str, SeedValues]],
    combine: Callable[[dict[str, float]], float] | None = None,
    metric: str = "acc",
) -> DatasetAverage | None:
    """Per seed, the mean over datasets of `metric` (or `combine(mean per metric)`); Stat over seeds.

    `per_dataset[dataset][metric][seed]` holds the values. Only seeds present for every dataset and
    metric enter, so an average is never built from a different set of datasets for each seed.
    """
    if not per_dataset:
        return None
    seed_sets = [set(by_seed) for metrics in per_dataset.values() for by_seed in metrics.values()]
    common = sorted(set.intersection(*seed_sets)) if seed_sets else []
    dropped = {
        dataset: tuple(sorted(set().union(*(set(s) for s in metrics.values())) - set(common)))
        for dataset, metrics in per_dataset.items()
    }
    dropped = {dataset: seeds for dataset, seeds in dropped.items() if seeds}
    if not common:
        return DatasetAverage(Stat(()), (), dropped)
    values = []
    for seed in common:
        means = {
            name: statistics.fmean(statistics.fmean(metrics[name][seed]) for metrics in per_dataset.values())
            for name in next(iter(per_dataset.values()))
        }
        values.append(combine(means) if combine else means[metric])
    return DatasetAverage(Stat.of(values), tuple(common), dropped)
