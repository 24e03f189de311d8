"""Probes: measurements of a snapshot's fragility."""

from lightning_overtrain.probes.base import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.probes.noise import NoiseProbe, noise_direction_seed, perturb_

__all__ = [
    "NoiseProbe",
    "Probe",
    "ProbeContext",
    "ProbeFailure",
    "noise_direction_seed",
    "perturb_",
]
