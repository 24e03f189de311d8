"""The Gaussian-noise probe (Springer et al. 2025, section 3.3).

``theta_pert = theta + eps`` with ``eps ~ N(0, gamma^2 * Sigma)``, ``Sigma`` the
initialization covariance: each tensor gets i.i.d. noise of std ``gamma * sigma_t``.
Two variance reductions, both always on:

* antithetic pairs: ``theta + eps`` and ``theta - eps`` are evaluated together,
  so the odd-order terms of the loss cancel in their mean;
* common random numbers: noise direction ``k`` comes from a seed derived from
  ``(seed, k)`` alone, so every snapshot sees the same directions and the trend
  over tokens is not buried in sampling noise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_overtrain import keys
from lightning_overtrain.checks import check_int, check_positive_numbers
from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.engine.noise import CHUNK, normal_at, normal_range, tensor_key
from lightning_overtrain.engine.sharding import global_positions, local_tensor
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.layers import LayerGroups, group_parameters


def noise_direction_seed(seed: int, pair: int) -> int:
    """The seed of noise direction ``pair``: a function of ``(seed, pair)`` only."""
    return int(np.random.SeedSequence([seed, pair]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor],
    saved: Sequence[torch.Tensor],
    sigmas: Sequence[float],
    scale: float,
    seed: int,
    tensor_ids: Sequence[int] | None = None,
) -> None:
    """Set ``params[i] = saved[i] + scale * sigmas[i] * z_i`` in place, ``z_i ~ N(0, I)``.

    The noise of an element depends only on ``seed``, its tensor's id and its
    position in the global tensor (a counter-based generator,
    :mod:`lightning_overtrain.engine.noise`), so every rank, any sharding (FSDP2
    ``DTensor`` shards are perturbed locally) and every snapshot see the same
    directions; ``scale=-g`` gives the antithetic partner of ``scale=g``. Tensors
    with ``sigma = 0`` are left alone. Noise is drawn in float32 (float64 for
    float64 tensors), added to the saved value in that precision and rounded to
    the parameter's dtype once, in blocks, on the parameter's device; the global
    RNG never moves. Under FSDP2, call ``backup.reshard()`` after it, so the next
    forward pass gathers the perturbed shards.

    Args:
        params: the live parameters (plain tensors or DTensors).
        saved: their unperturbed values (local shards, on any device).
        sigmas: ``sigma_t`` per tensor.
        scale: ``+gamma`` or ``-gamma``.
        seed: the direction's seed (see :func:`noise_direction_seed`).
        tensor_ids: each tensor's id in the whole model (default ``0, 1, ...``), so a
            subset of the tensors gets the same noise as in the whole model.
    """
    ids = range(len(params)) if tensor_ids is None else tensor_ids
    for param, base, sigma, tid in zip(params, saved, sigmas, ids):
        if sigma == 0.0:
            continue
        local = local_tensor(param)
        key = _key(seed, tid)
        dtype = torch.promote_types(local.dtype, torch.float32)
        start, index = global_positions(param)
        if start is None or not local.is_contiguous():
            if index is None:
                index = torch.arange(local.numel(), device=local.device).view(local.shape) + start
            z = normal_at(key, index).to(dtype).mul_(scale * sigma)
            local.copy_(z.add_(base.to(local.device, non_blocking=True)))
            continue
        out, source = local.view(-1), base.reshape(-1)
        for a in range(0, out.numel(), CHUNK):
            b = min(a + CHUNK, out.numel())
            z = normal_range(key, start + a, b - a, local.device).to(dtype).mul_(scale * sigma)
            # One rounding: saved + noise in float32, then the parameter's dtype.
            out[a:b].copy_(z.add_(source[a:b].to(local.device, non_blocking=True)))


@functools.lru_cache(maxsize=4096)
def _key(seed: int, tensor_id: int) -> int:
    return tensor_key(seed, 0, tensor_id)


def summarize_noise(
    reference_loss: float, plus: Sequence[float], minus: Sequence[float]
) -> dict[str, float]:
    """The paper's quantities for one gamma from antithetic pair losses.

    Args:
        reference_loss: ``L(theta_T)``.
        plus: ``L(theta_T + eps_k)`` for each pair ``k``.
        minus: ``L(theta_T - eps_k)`` for each pair ``k``.

    Returns:
        ``perturbed_loss`` (``E[L(theta + eps)]``), ``delta`` (minus ``L(theta)``),
        ``relative_delta`` (``delta / L(theta)``) and the standard error of each,
        taken across pairs (NaN with a single pair).
    """
    pair_means = (np.asarray(plus, dtype=np.float64) + np.asarray(minus, dtype=np.float64)) / 2
    perturbed = float(pair_means.mean())
    n = len(pair_means)
    stderr = float(pair_means.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    delta = perturbed - reference_loss
    return {
        "perturbed_loss": perturbed,
        "perturbed_loss_stderr": stderr,
        "delta": delta,
        "delta_stderr": stderr,
        "relative_delta": delta / reference_loss,
        "relative_delta_stderr": stderr / abs(reference_loss),
    }


class NoiseProbe(Probe):
    """Sensitivity of the snapshot to init-scaled Gaussian noise, per ``gamma``.

    For each gamma it logs ``noise/gamma=<g>/perturbed_loss``, ``/delta``
    (``delta_gamma(T) = E[L(theta_T + eps)] - L(theta_T)``), ``/relative_delta`` and
    their ``_stderr``, and ``/perturbed_loss_samples``: the antithetic mean of each noise
    direction, in direction order (a list; loggers and CSV columns leave it out). Cost
    per snapshot: ``2 * pairs * len(gammas)`` passes over the reference set.

    With ``per_layer``, it also perturbs one group of parameters at a time (the
    embeddings, each transformer block, the head) and logs the same quantities per
    group as ``noise/gamma=<g>/layer=<group>/delta`` etc., so a logger can draw
    tokens x layers. Cost: ``2 * pairs * len(layer_gammas) * groups`` more passes.

    Args:
        gammas: noise magnitudes, as multiples of the init std; each > 0.
        pairs: antithetic pairs per gamma (the same directions for every gamma); >= 1,
            >= 2 for a standard error.
        seed: the seed of the noise directions, the same at every snapshot.
        per_layer: False; True to infer groups (transformer blocks, see
            :func:`~lightning_overtrain.probes.layers.infer_layer_groups`; groups that hold
            only constant-initialized tensors are left out); a mapping
            ``{group: [parameter-name prefixes]}``; or a callable ``name -> group``.
        layer_gammas: the gammas to probe per layer (default: all of ``gammas``);
            one or two bound the cost.

    Raises:
        ValueError: on an empty ``gammas``, a gamma <= 0, ``pairs`` < 1, a bad seed or
            bad ``layer_gammas``; before training, on a group with no noise to apply.

    Example::

        monitor = OvertrainingMonitor(
            reference_data=val_batches,
            points_per_decade=4,
            probes=[NoiseProbe(gammas=(0.25, 0.5, 1.0), pairs=4)],
        )
    """

    name = "noise"

    def __init__(
        self,
        gammas: Sequence[float] = (0.25, 0.5, 1.0),
        pairs: int = 4,
        seed: int = 0,
        *,
        per_layer: bool | LayerGroups = False,
        layer_gammas: Sequence[float] | None = None,
    ) -> None:
        gammas = _checked_gammas(gammas, "gammas")
        fix = "Use pairs=4 (the default) or more; 2 or more give a standard error."
        check_int("pairs", pairs, 1, fix, integral_floats=False)
        check_int("seed", seed, 0, "Pass e.g. seed=0.", integral_floats=False)
        if not (isinstance(per_layer, (bool, Mapping)) or callable(per_layer)):
            raise ValueError(
                f"`per_layer` must be a bool, a mapping {{group: [name prefixes]}} or a callable"
                f" name -> group, got {type(per_layer).__name__}."
            )
        if layer_gammas is not None and per_layer is False:
            raise ValueError(
                "`layer_gammas` is set but `per_layer` is False. Pass per_layer=True to probe"
                " each layer, or drop `layer_gammas`."
            )
        self.gammas = tuple(float(g) for g in gammas)
        self.pairs = pairs
        self.seed = seed
        self.per_layer = per_layer
        self.layer_gammas = (
            self.gammas
            if layer_gammas is None
            else tuple(float(g) for g in _checked_gammas(layer_gammas, "layer_gammas"))
        )
        self.layer_groups: dict[str, list[int]] = {}

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "gammas": list(self.gammas),
            "pairs": self.pairs,
            "seed": self.seed,
        }
        if self.per_layer is not False:
            config["layer_groups"] = list(self.layer_groups)
            config["layer_gammas"] = list(self.layer_gammas)
        return config

    def signals(self) -> list[Signal]:
        """Per gamma: the perturbed loss (U-shaped, ``reference_loss + delta``) and ``delta``;
        per layer (once :meth:`validate` found the groups): ``delta``, drawn as a heatmap."""
        groups = list(self.layer_groups)
        return keys.noise_signals(
            self.gammas, {g: groups for g in self.layer_gammas} if groups else None
        )

    def validate(self, ctx: ProbeContext) -> None:
        if not any(s > 0 for s in ctx.sigmas):
            raise ValueError(
                "NoiseProbe found no parameter with a non-zero init std, so no noise would be"
                " applied. Pass `init_std` to OvertrainingMonitor (e.g. 0.02)."
            )
        if self.per_layer is not False:
            self.layer_groups = self._noisy_groups(ctx)

    def _noisy_groups(self, ctx: ProbeContext) -> dict[str, list[int]]:
        inferred = self.per_layer is True
        groups = group_parameters(ctx.backup.names, None if inferred else self.per_layer)
        noisy = {g: [i for i in members if ctx.sigmas[i] > 0] for g, members in groups.items()}
        silent = [g for g, members in noisy.items() if not members]
        if silent and not inferred:
            raise ValueError(
                f"`per_layer` group(s) {silent} hold only constant-initialized tensors (init std"
                " 0: norm gains, biases), so noise would not change them. Drop those groups or"
                " give `init_std` for their tensors."
            )
        # An inferred head of only a final norm (GPT-2 ties its output to the embeddings).
        return {g: members for g, members in noisy.items() if members}

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        n_gammas, pairs = len(self.gammas), self.pairs
        saved = ctx.backup.saved_params()
        seeds = [noise_direction_seed(self.seed, k) for k in range(pairs)]

        def local() -> torch.Tensor:
            sums = torch.zeros((n_gammas, pairs, 2, 2), dtype=torch.float64, device=ctx.device)
            for gi, gamma in enumerate(self.gammas):
                for k, seed in enumerate(seeds):
                    for si, scale in enumerate((gamma, -gamma)):
                        perturb_(ctx.backup.params, saved, ctx.sigmas, scale, seed)
                        ctx.backup.reshard()  # FSDP2: the next forward gathers the noise
                        sums[gi, k, si] = ctx.local_loss_sums()
            return sums

        sums = ctx.reduce_or_fail(local, (n_gammas, pairs, 2, 2))
        losses = (sums[..., 0] / sums[..., 1]).cpu().numpy()
        record: dict[str, Any] = {}
        for gi, gamma in enumerate(self.gammas):
            if not np.isfinite(losses[gi]).all():
                continue  # only this gamma's numbers are lost (see below)
            summary = summarize_noise(ctx.reference_loss, losses[gi, :, 0], losses[gi, :, 1])
            record.update({keys.noise_key(gamma, q): v for q, v in summary.items()})
            # Each direction's antithetic mean, in direction order: the same directions at
            # every snapshot, so the detector judges a rise on paired differences.
            pair_means = (losses[gi, :, 0].astype(np.float64) + losses[gi, :, 1]) / 2
            record[keys.samples_key(keys.noise_key(gamma, "perturbed_loss"))] = [
                float(v) for v in pair_means
            ]
        blown = [g for gi, g in enumerate(self.gammas) if not np.isfinite(losses[gi]).all()]
        if blown:
            raise ProbeFailure(f"non-finite perturbed loss at gamma(s) {blown}", partial=record)
        if self.layer_groups:
            ctx.backup.restore()  # each group is perturbed with the others at the saved weights
            try:
                record.update(self._run_per_layer(ctx, saved, seeds))
            except ProbeFailure as exc:
                raise ProbeFailure(f"per layer: {exc}", partial=record) from exc
        return record

    def _run_per_layer(
        self, ctx: ProbeContext, saved: Sequence[torch.Tensor], seeds: Sequence[int]
    ) -> dict[str, float]:
        groups = list(self.layer_groups.items())
        shape = (len(self.layer_gammas), len(groups), self.pairs, 2, 2)
        params, sigmas = ctx.backup.params, ctx.sigmas

        def local() -> torch.Tensor:
            sums = torch.zeros(shape, dtype=torch.float64, device=ctx.device)
            for gr, (_, members) in enumerate(groups):
                group_params = [params[i] for i in members]
                group_saved = [saved[i] for i in members]
                group_sigmas = [sigmas[i] for i in members]
                for gi, gamma in enumerate(self.layer_gammas):
                    for k, seed in enumerate(seeds):
                        for si, scale in enumerate((gamma, -gamma)):
                            # The group's tensors get the noise they get in the whole model.
                            perturb_(group_params, group_saved, group_sigmas, scale, seed, members)
                            ctx.backup.reshard()
                            sums[gi, gr, k, si] = ctx.local_loss_sums()
                # Only this group moved: put it back before perturbing the next one.
                with torch.no_grad():
                    for param, base in zip(group_params, group_saved):
                        local_tensor(param).copy_(base)
                ctx.backup.reshard()
            return sums

        sums = ctx.reduce_or_fail(local, shape)
        losses = (sums[..., 0] / sums[..., 1]).cpu().numpy()
        if not np.isfinite(losses).all():
            raise ProbeFailure(f"non-finite perturbed loss at layer gammas {self.layer_gammas}")
        record: dict[str, float] = {}
        for gi, gamma in enumerate(self.layer_gammas):
            for gr, (group, _) in enumerate(groups):
                summary = summarize_noise(
                    ctx.reference_loss, losses[gi, gr, :, 0], losses[gi, gr, :, 1]
                )
                record.update(
                    {keys.layer_noise_key(gamma, group, q): v for q, v in summary.items()}
                )
        return record


def _checked_gammas(gammas: float | Sequence[float], argument: str) -> tuple[float, ...]:
    return check_positive_numbers(
        argument,
        gammas,
        "a non-empty sequence of numbers > 0",
        "Pass noise magnitudes relative to the init std, e.g. gammas=(0.25, 0.5, 1.0).",
    )
