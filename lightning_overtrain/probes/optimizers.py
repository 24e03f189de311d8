"""The fine-tune probe's optimizer factories: ``factory(params, lr) -> torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]


def adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The default fine-tune optimizer: ``torch.optim.AdamW(params, lr=lr)``.

    Its state is two parameter-sized tensors (the moments), allocated at the
    first step and freed after each lr.
    """
    return torch.optim.AdamW(params, lr=lr)


def sgd(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """A lighter fine-tune optimizer: plain ``torch.optim.SGD`` with no state at all.

    Pass ``optimizer=sgd`` where memory is tight: the probe's extra memory drops
    from about 4 x parameters (backup, gradients, AdamW's two moments) to about
    2 x (backup and gradients). The numbers differ from AdamW's, so keep the
    choice fixed for the run.
    """
    return torch.optim.SGD(params, lr=lr)
