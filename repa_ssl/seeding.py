"""Seeds derived per epoch, so a resumed run draws what the uninterrupted one drew."""
from __future__ import annotations

import numpy as np

__all__ = ["epoch_seed"]


def epoch_seed(seed: int, rank: int, epoch: int, *more: int) -> int:
    """A 32-bit seed for one epoch of one process (``more``: e.g. a DataLoader worker), from numpy's
    ``SeedSequence``: distinct tuples give independent streams. DINO seeds its loader with it, CLIP its sample
    shuffle and generators (``clip.patches.fix_reproducible_epochs``)."""
    return int(np.random.SeedSequence([seed, rank, epoch, *more]).generate_state(1)[0])
