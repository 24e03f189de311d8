"""Probes: measurements of a snapshot's fragility."""

from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.probes.finetune import FineTuneProbe, next_token_inputs
from lightning_overtrain.probes.noise import NoiseProbe, noise_direction_seed, perturb_

__all__ = [
    "FineTuneProbe",
    "NoiseProbe",
    "Probe",
    "ProbeContext",
    "ProbeFailure",
    "next_token_inputs",
    "noise_direction_seed",
    "perturb_",
]
