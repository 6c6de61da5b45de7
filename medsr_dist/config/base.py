"""What every config section shares: the :class:`Section` base, :class:`ConfigError` and range checks."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the source and the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Range = tuple[float, float]


def _check_range(value: Range) -> Range:
    if value[0] > value[1]:
        raise ValueError(f"range lower bound {value[0]} exceeds upper bound {value[1]}")
    return value


def _check_probs(value: list[float]) -> list[float]:
    if any(p < 0 for p in value) or abs(sum(value) - 1.0) > 1e-6:
        raise ValueError(f"probabilities must be non-negative and sum to 1, got {value}")
    return value
