"""The error of every weights source and loader (a module of its own: :mod:`medsr_dist.models.zoo` raises it and
:mod:`medsr_dist.models.weights` builds on the zoo, so it must sit below both)."""
from __future__ import annotations


class WeightsError(RuntimeError):
    """A weights file is missing, unsafe, or does not fit the network; the message names the source."""
