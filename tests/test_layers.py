"""Per-layer noise sensitivity: which parameters form a layer, and a delta per layer."""

import pytest
import torch
from conftest import make_module, quadratic_context, reference_batches
from torch import nn

from lightning_overtrain import NoiseProbe, ProbeContext, keys
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.probes.layers import group_parameters, infer_layer_groups


class Quadratic(nn.Module):
    """L = 0.5 sum(h * (theta - 1)^2) + 1 over tensors `a` and `b`; `gain` is constant-init."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(30, generator=gen, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.float64))
        self.gain = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.register_buffer("h_a", torch.rand(30, generator=gen, dtype=torch.float64) + 0.5)
        self.register_buffer("h_b", torch.rand(4, 5, generator=gen, dtype=torch.float64) + 0.5)

    def loss(self) -> torch.Tensor:
        quad = (self.h_a * (self.a - 1) ** 2).sum() + (self.h_b * (self.b - 1) ** 2).sum()
        return 0.5 * quad + 1.0 + 0.0 * self.gain.sum()


def raise_failure(what, exc):
    raise exc


def gpt2_names() -> list[str]:
    return [n for n, _ in make_module().named_parameters()]


def test_gpt2_groups_are_embeddings_each_block_and_head():
    groups = infer_layer_groups(gpt2_names())
    assert list(groups) == ["embeddings", "h.0", "h.1", "head"]
    assert groups["embeddings"] == ["model.transformer.wte.weight", "model.transformer.wpe.weight"]
    assert groups["head"] == ["model.transformer.ln_f.weight", "model.transformer.ln_f.bias"]
    assert all(n.startswith("model.transformer.h.1.") for n in groups["h.1"])
    assert sum(map(len, groups.values())) == len(gpt2_names())


def test_llama_groups_put_the_final_norm_and_untied_head_last():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    names = [n for n, _ in LlamaForCausalLM(config).named_parameters()]
    groups = infer_layer_groups(names)
    assert list(groups) == ["embeddings", "layers.0", "layers.1", "layers.2", "head"]
    assert groups["head"] == ["model.norm.weight", "lm_head.weight"]


def test_two_stacks_keep_distinct_group_names():
    names = ["enc.layers.0.w", "enc.layers.1.w", "dec.layers.0.w", "out.w"]
    assert list(infer_layer_groups(names)) == [
        "enc.layers.0",
        "enc.layers.1",
        "dec.layers.0",
        "head",
    ]


def test_a_model_without_blocks_asks_for_groups():
    with pytest.raises(ValueError, match=r"Cannot infer layer groups.*`per_layer` as a"):
        infer_layer_groups(["a", "b", "gain"])


def test_prefix_groups_match_at_dots_in_the_given_order():
    names = ["h.1.w", "h.10.w", "h.1.b", "wte.weight"]
    groups = group_parameters(names, {"one": ["h.1"], "rest": [""]})
    assert groups == {"one": [0, 2], "rest": [1, 3]}


def test_a_callable_groups_by_name_and_may_leave_parameters_out():
    groups = group_parameters(["a", "b", "gain"], lambda n: None if n == "gain" else n.upper())
    assert groups == {"A": [0], "B": [1]}


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"x": ["nope"]}, r"group\(s\) \['x'\] match no parameter"),
        ({"x": "a"}, r"`per_layer\['x'\]` must be a list of parameter-name prefixes"),
        ({"a/b": ["a"]}, "without '/' or spaces"),
        (lambda n: None, "put no parameter in any group"),
    ],
)
def test_bad_groups_are_refused_with_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        group_parameters(["a", "b"], spec)


def test_noise_probe_refuses_bad_layer_arguments():
    with pytest.raises(ValueError, match="`layer_gammas` is set but `per_layer` is False"):
        NoiseProbe(layer_gammas=(1.0,))
    with pytest.raises(ValueError, match="`layer_gammas` must be a non-empty sequence"):
        NoiseProbe(per_layer=True, layer_gammas=(0.0,))
    with pytest.raises(ValueError, match="`per_layer` must be a bool"):
        NoiseProbe(per_layer=3)


def test_a_group_of_only_constant_tensors_is_refused_before_training():
    probe = NoiseProbe(gammas=(1.0,), pairs=1, per_layer={"gain": ["gain"]})
    with pytest.raises(ValueError, match=r"\['gain'\] hold only constant-initialized tensors"):
        probe.validate(quadratic_context(Quadratic()))


def test_one_group_of_everything_reproduces_the_whole_model_delta():
    probe = NoiseProbe(gammas=(0.5,), pairs=3, per_layer={"all": [""]})
    ctx = quadratic_context(Quadratic())
    probe.validate(ctx)
    record = measure_snapshot(ctx, [probe], raise_failure)
    for quantity in ("perturbed_loss", "delta", "delta_stderr"):
        whole = record[keys.noise_key(0.5, quantity)]
        assert record[keys.layer_noise_key(0.5, "all", quantity)] == whole


def test_each_group_is_measured_alone_and_put_back_before_the_next():
    alone = NoiseProbe(gammas=(1.0,), pairs=2, per_layer={"b": ["b"]})
    after_a = NoiseProbe(gammas=(1.0,), pairs=2, per_layer={"a": ["a"], "b": ["b"]})
    results = []
    for probe in (alone, after_a):
        ctx = quadratic_context(Quadratic())
        probe.validate(ctx)
        results.append(measure_snapshot(ctx, [probe], raise_failure))
    key = keys.layer_noise_key(1.0, "b", "delta")
    assert results[1][key] == results[0][key]
    assert results[1][keys.layer_noise_key(1.0, "a", "delta")] != results[1][key]


def test_per_layer_delta_matches_the_second_order_prediction_per_tensor():
    """For the quadratic, group `a` alone: E[delta] = 0.5 gamma^2 sigma_a^2 tr(H_aa)."""
    model = Quadratic()
    probe = NoiseProbe(gammas=(0.1,), pairs=64, per_layer={"a": ["a"]})
    ctx = quadratic_context(model)
    probe.validate(ctx)
    record = measure_snapshot(ctx, [probe], raise_failure)
    expected = 0.5 * 0.1**2 * 0.3**2 * float(model.h_a.sum())
    got = record[keys.layer_noise_key(0.1, "a", "delta")]
    assert got == pytest.approx(expected, rel=0.25)


def test_gpt2_per_layer_keys_parse_for_a_tokens_by_layers_chart():
    module = make_module()
    backup = ModelBackup(module)
    ctx = ProbeContext(
        module=module,
        backup=backup,
        sigmas=[0.02 if p.dim() >= 2 else 0.0 for p in backup.params],
        batches=reference_batches(b"x" * 4096, n=1),
        weights=[256],
        loss_fn=transformers_loss,
    )
    probe = NoiseProbe(gammas=(0.5, 1.0), pairs=1, per_layer=True, layer_gammas=(1.0,))
    probe.validate(ctx)
    # GPT-2 ties its head to the embeddings: the inferred head holds only ln_f (no noise).
    assert probe.config()["layer_groups"] == ["embeddings", "h.0", "h.1"]
    record = measure_snapshot(ctx, [probe], raise_failure)
    parsed = {keys.parse_layer_noise_key(k) for k in record} - {None}
    assert {(gamma, group) for gamma, group, q in parsed if q == "delta"} == {
        (1.0, "embeddings"),
        (1.0, "h.0"),
        (1.0, "h.1"),
    }
    assert keys.parse_layer_noise_key("noise/gamma=1/delta") is None
