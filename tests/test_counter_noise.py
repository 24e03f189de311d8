"""Counter-based noise: a pure function of (key, global position), the same in any block."""

import numpy as np
import pytest
import torch
from conftest import SIGMAS
from test_noise import Quadratic

from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.noise import normal_at, normal_range, reference_normal, tensor_key
from lightning_overtrain.probes.noise import perturb_

CPU = torch.device("cpu")


def test_the_torch_generator_matches_its_unsigned_definition():
    key = tensor_key(5, 2, 9)
    z = normal_range(key, 0, 100_001, CPU)
    np.testing.assert_allclose(z.numpy(), reference_normal(key, np.arange(100_001)), atol=1e-5)


@pytest.mark.parametrize("start, count", [(0, 7), (1, 6), (3, 1), (999, 2000)])
def test_any_block_of_positions_gets_the_same_numbers_as_the_whole(start, count):
    key = tensor_key(0, 0, 3)
    whole = normal_range(key, 0, 4000, CPU)
    assert torch.equal(normal_range(key, start, count, CPU), whole[start : start + count])
    index = torch.arange(start, start + count)
    torch.testing.assert_close(normal_at(key, index), whole[start : start + count])


def test_the_numbers_are_standard_normal_and_independent_across_keys():
    a = normal_range(tensor_key(1, 0, 0), 0, 1_000_000, CPU).double()
    b = normal_range(tensor_key(1, 1, 0), 0, 1_000_000, CPU).double()
    # Bounds at about 4 standard errors of each statistic for 1e6 draws.
    assert abs(a.mean()) < 0.005 and abs(a.std() - 1) < 0.003
    assert abs((a**4).mean() - 3) < 0.04  # Gaussian kurtosis
    assert abs((a * b).mean()) < 0.01  # another direction: uncorrelated
    assert abs((a[::2] * a[1::2]).mean()) < 0.01  # the cosine and sine of one draw


def test_a_subset_of_tensors_gets_the_noise_it_gets_in_the_whole_model():
    model = Quadratic()
    backup = ModelBackup(model)
    backup.save()
    saved, sigmas = backup.saved_params(), [SIGMAS[n] for n in backup.names]
    perturb_(backup.params, saved, sigmas, 1.0, seed=4)
    whole = [p.detach().clone() for p in backup.params]
    backup.restore()
    perturb_(backup.params[1:], saved[1:], sigmas[1:], 1.0, seed=4, tensor_ids=[1, 2])
    assert torch.equal(backup.params[1], whole[1]) and torch.equal(backup.params[0], saved[0])


def test_a_host_side_backup_restores_exactly_and_perturbs_the_same():
    model = Quadratic()
    on_device, on_host = ModelBackup(model), ModelBackup(model, device="cpu")
    assert on_host.nbytes == on_device.nbytes
    on_device.save()
    on_host.save()
    sigmas = [SIGMAS[n] for n in on_host.names]
    perturb_(on_host.params, on_host.saved_params(), sigmas, 0.5, seed=1)
    from_host = [p.detach().clone() for p in on_host.params]
    perturb_(on_device.params, on_device.saved_params(), sigmas, 0.5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(from_host, on_device.params))
    on_host.restore()
    assert all(torch.equal(a, b) for a, b in zip(on_host.params, on_device.saved_params()))


def test_the_backup_device_is_checked_by_name():
    from lightning_overtrain import OvertrainingMonitor

    with pytest.raises(ValueError, match=r"`backup_device` must be None .* got 'gpu'"):
        OvertrainingMonitor(
            [{"input_ids": torch.zeros(1, 2)}], every_n_steps=1, backup_device="gpu"
        )
