"""The model_version string: the one place that names a project's feature generation and round.

`asvp-g<generation>-r<round>` is what /setup returns, what predictions carry, what the project's
model_version is set to and what /versions lists. Generation 0 is the pre-trained backbone; a round is
one proxy retrain. Round 0 means "no proxy yet".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PATTERN = re.compile(r"^asvp-g(\d+)-r(\d+)$")


@dataclass(frozen=True, order=True)
class ModelVersion:
    generation: int = 0
    round: int = 0

    def __post_init__(self) -> None:
        if self.generation < 0 or self.round < 0:
            raise ValueError("generation and round must be >= 0")

    def __str__(self) -> str:
        return f"asvp-g{self.generation}-r{self.round}"

    @classmethod
    def parse(cls, text: str) -> ModelVersion:
        match = _PATTERN.match(text)
        if not match:
            raise ValueError(f"not an asvp model version: {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def next_round(self) -> ModelVersion:
        return ModelVersion(self.generation, self.round + 1)

    def next_generation(self) -> ModelVersion:
        """A new feature generation keeps counting rounds, so versions stay strictly increasing."""
        return ModelVersion(self.generation + 1, self.round + 1)
