"""A label space: the classes a batch of logits ranges over, with their prompt templates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelSpace:
    """`name` keys the metrics (`test/<name>/acc`); prompts are class-major: class c, template t."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[str]:
        return [template.format(name) for name in self.classnames for template in self.templates]
