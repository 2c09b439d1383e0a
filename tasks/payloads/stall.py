"""Data-loader stall fraction, the same way for every payload.

stall = 1 - (time of N training steps on synthetic batches already in memory)
          / (time of the same N steps with the real loader)

The synthetic pass runs after training on a snapshot of the model and optimizer, which are
restored afterwards: the trained weights and the checkpoint are unaffected.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn


def synthetic_seconds(
    model: nn.Module, opt: torch.optim.Optimizer, step: Callable[[int], None], steps: int,
    sync: Callable[[], None] = lambda: None,
) -> float:  # fmt: skip
    saved = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    seconds = time.perf_counter() - t0
    model.load_state_dict(saved)
    opt.load_state_dict(saved_opt)
    return seconds


def stall_fraction(real_s: float, synthetic_s: float) -> float:
    if real_s <= 0:
        return 0.0
    return max(0.0, 1.0 - synthetic_s / real_s)
