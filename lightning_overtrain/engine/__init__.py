"""The engine: borrowing the live model, data, losses, collectives and one snapshot's measurements.

It knows no probe and no Lightning ``Trainer``: :class:`~lightning_overtrain.engine.contract.Probe`
and :class:`~lightning_overtrain.engine.contract.ProbeContext` are its contract with them.
"""
