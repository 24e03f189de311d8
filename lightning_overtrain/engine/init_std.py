"""``sigma_t``: the initialization std of each parameter tensor, which scales the noise.

The paper perturbs with ``eps ~ N(0, gamma^2 * Sigma)``, ``Sigma`` the covariance of
the initialization distribution. Per tensor that is i.i.d. noise of std
``gamma * sigma_t``; constant-initialized tensors (norm gains, zero biases) have
``sigma_t = 0`` and are never perturbed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lightning_overtrain.engine.sharding import full_tensor

InitStd = float | Mapping[str, float] | Callable[[str, torch.Tensor], float]

SOURCE_WEIGHTS = "weights at step 0"
SOURCE_USER = "init_std argument"
SOURCE_CONFIG = "config.initializer_range"


def init_std_from_weights(module: nn.Module) -> dict[str, float]:
    """Measure ``sigma_t`` from freshly initialized weights (the std of each tensor).

    A tensor with one element, or whose values are all equal, counts as constant.
    A sharded tensor (FSDP2 ``DTensor``) is gathered one at a time, so every rank
    gets the std of the whole tensor, exactly as one unsharded process would (call
    it on every rank).

    Example::

        >>> sig = init_std_from_weights(nn.LayerNorm(4))
        >>> sig["weight"], sig["bias"]
        (0.0, 0.0)
    """
    sigmas = {}
    for name, param in module.named_parameters():
        # The whole tensor (gathered one at a time when sharded), in float64.
        data = full_tensor(param.detach())
        sigmas[name] = float(data.double().std()) if data.numel() > 1 else 0.0
    return sigmas


def init_std_from_value(module: nn.Module, init_std: InitStd) -> dict[str, float]:
    """``sigma_t`` from what the user says about the initialization.

    Args:
        module: the model.
        init_std: a float (the std of every matrix and embedding; vectors such as
            biases and norm gains count as constant, the transformers convention),
            a mapping ``{parameter name: std}`` covering every parameter, or a
            callable ``(name, param) -> std``.

    Raises:
        ValueError: on a negative or non-finite std, or a mapping that misses parameters.
    """
    named = list(module.named_parameters())
    if isinstance(init_std, Mapping):
        missing = [n for n, _ in named if n not in init_std]
        if missing:
            raise ValueError(
                f"`init_std` has no entry for {len(missing)} parameter(s), e.g. {missing[:3]}."
                " Give a std for every name in `module.named_parameters()` (0.0 for constants)."
            )
        sigmas = {n: float(init_std[n]) for n, _ in named}
    elif callable(init_std):
        sigmas = {}
        for n, p in named:
            value = init_std(n, p)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"`init_std` returned {value!r} for {n!r}; it must return a float std"
                    " for every parameter (0.0 for constant-initialized tensors)."
                )
            sigmas[n] = float(value)
    else:
        std = float(init_std)
        sigmas = {n: (std if p.dim() >= 2 else 0.0) for n, p in named}
    bad = {n: s for n, s in sigmas.items() if not (math.isfinite(s) and s >= 0)}
    if bad:
        raise ValueError(
            f"`init_std` must give finite stds >= 0, got {dict(list(bad.items())[:3])}."
            " Pass the std each tensor was initialized with."
        )
    return sigmas


def config_initializer_range(module: nn.Module) -> float | None:
    """The ``initializer_range`` of the first transformers config found in ``module``."""
    for sub in module.modules():
        value = getattr(getattr(sub, "config", None), "initializer_range", None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def check_init_std(init_std: object) -> None:
    """Reject an ``init_std`` argument of the wrong kind, at construction time."""
    if init_std is None or isinstance(init_std, Mapping) or callable(init_std):
        return
    if (
        isinstance(init_std, bool)
        or not isinstance(init_std, (int, float))
        or not math.isfinite(init_std)
        or init_std <= 0
    ):
        raise ValueError(
            f"`init_std` must be a positive float, a {{name: std}} mapping or a callable,"
            f" got {init_std!r}. Pass the std your model was initialized with, e.g. 0.02."
        )
