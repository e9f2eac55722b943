"""The method registry: every method class, its name and what it can do, in one place.

A method registers itself where it is defined (`@register_method("coop", ...)` on its class), so adding
one touches only its own module, its config(s) and its tests. `train`, `bench`, the README's method
table and the tests read the registry (`registered_methods`, `method_spec`) instead of lists kept by
hand; every module of `vlm_adapt.methods` is imported on first use, so no list of modules exists either.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from vlm_adapt.errors import ConfigError

if TYPE_CHECKING:
    from vlm_adapt.methods.base import CLIPMethod

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
TASKS = (CLASSIFICATION, RETRIEVAL)


@dataclass(frozen=True)
class CacheSpec:
    """Something a method computes from the training images once or every epoch and trains from."""

    what: str  # e.g. "normalized image features"
    refresh: str  # "once" or "epoch"
    augmented: bool  # built from augmented images (then refreshed every epoch)
    # the key of a cache built by the shared service (vlm_adapt/data/sample_cache.py) from the method's
    # `cache_requests()`; None: a cache the method fills itself (UniPT's lazily filled hidden states)
    name: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config name, class and capabilities."""

    name: str
    cls: type[CLIPMethod]
    tasks: tuple[str, ...] = (CLASSIFICATION,)
    fit: str = "gradient"  # "gradient" (optimizer steps), "closed_form" (fitted at epoch end), "none"
    caches: tuple[CacheSpec, ...] = field(default_factory=tuple)

    @property
    def trains(self) -> bool:
        return self.fit != "none"

    def supports(self, task: str) -> bool:
        return task in self.tasks


_REGISTRY: dict[str, MethodSpec] = {}
_discovered = False
Method = TypeVar("Method", bound=type)


FITS = ("gradient", "closed_form", "none")


def register_method(
    name: str, *, tasks: tuple[str, ...] = (CLASSIFICATION,), fit: str = "gradient",
    caches: tuple[CacheSpec, ...] = (),
):
    """Class decorator: register `name` (the `method=` config name) for the decorated CLIPMethod class.

    `tasks`: what it can be run for; `fit`: how it learns (`gradient`, `closed_form`: fitted from the
    training images the task shows it through `observe`, `none`: zero-shot); `caches`: what it computes
    from the training images and trains from."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"method {name!r}: unknown tasks {unknown}; pick from {TASKS}")
    if fit not in FITS:
        raise ValueError(f"method {name!r}: fit={fit!r}; pick from {FITS}")
    for cache in caches:
        if cache.refresh not in ("once", "epoch") or (cache.augmented and cache.refresh != "epoch"):
            raise ValueError(f"method {name!r}: a cache is refreshed once or every epoch (always if augmented)")

    def decorate(cls: Method) -> Method:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is taken by {existing.cls.__module__}.{existing.cls.__qualname__}")
        spec = MethodSpec(name, cls, tuple(tasks), fit, tuple(caches))
        cls.method_name = name
        cls.spec = spec
        _REGISTRY[name] = spec
        return cls

    return decorate


def _discover() -> None:
    """Import every module of `vlm_adapt.methods`, so that each method's decorator has run."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("vlm_adapt.methods")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _discovered = True


def registered_methods() -> dict[str, MethodSpec]:
    """Every registered method by name, in name order."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def method_spec(name: str) -> MethodSpec:
    """The registered method `name`; an unknown name is an error listing the registered ones."""
    methods = registered_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(methods)}")
    return methods[name]


def methods_supporting(task: str) -> list[str]:
    return [name for name, spec in registered_methods().items() if spec.supports(task)]
