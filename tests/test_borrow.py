import random

import numpy as np
import torch
from torch import nn

from lightning_overtrain.engine.backup import ModelBackup, borrowed


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


def test_backup_restores_parameters_and_buffers_bit_for_bit():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backup = ModelBackup(model)
    backup.save()
    model.train()
    model(torch.randn(16, 4))  # moves BatchNorm running stats
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    backup.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_backup_is_one_copy_of_parameters_and_buffers():
    model = small_model()
    expected = sum(
        t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
    )
    assert ModelBackup(model).nbytes == expected


def test_borrow_restores_modes_grad_mode_rng_and_grads():
    model = small_model()
    model.train()
    model[2].eval()  # a mixed mode that a blanket .train() would lose
    model(torch.randn(16, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    grad_objects = [p.grad for p in model.parameters()]
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    backup = ModelBackup(model)
    with borrowed(model, backup, train=True):
        assert all(m.training for m in model.modules())
        model.zero_grad(set_to_none=False)
        model(torch.randn(16, 4)).sum().backward()
        random.random(), np.random.rand(), torch.rand(3)
        torch.set_grad_enabled(False)
    assert torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    for param, grad, obj in zip(model.parameters(), grads, grad_objects):
        assert param.grad is obj and torch.equal(param.grad, grad)


def test_borrow_in_eval_mode_hands_back_the_weights_after_an_error():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    backup = ModelBackup(model)
    try:
        with borrowed(model, backup):
            assert not model.training
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            raise RuntimeError("probe blew up")
    except RuntimeError:
        pass
    assert model.training
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
