"""A label space: the classes a batch of logits ranges over, with their prompt templates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LabelSpace:
    """`name` keys the metrics (`test/<name>/acc`); prompts are class-major: class c, template t."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def with_templates(self, templates: Sequence[str] | None) -> LabelSpace:
        """The same classes prompted with `templates` instead (itself when there are none)."""
        return replace(self, templates=tuple(templates)) if templates else self

    def prompts(self) -> list[str]:
        return [template.format(name) for name in self.classnames for template in self.templates]
