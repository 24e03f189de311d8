"""Inputs as users write them, and messages that speak of what they passed."""

import math
import re

import pytest
import torch
from conftest import CONTEXT, make_module, make_trainer, train_loader
from torch.utils.data import DataLoader

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.checks import check_int
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.data import TokenBudget, take_reference_set
from lightning_overtrain.engine.losses import check_loss, transformers_loss
from lightning_overtrain.engine.tokens import count_tokens, describe_batch
from lightning_overtrain.testing.demo import ByteWindows


def batches(n: int, rows: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.full((rows, CONTEXT), i, dtype=torch.long)} for i in range(n)]


def one_period_at_the_end(message: str) -> bool:
    return message.endswith(".") and not message.endswith("..") and ". ." not in message


# ---------------------------------------------------------------------- integral floats
@pytest.mark.parametrize("value, expected", [(1e6, 1_000_000), (3.0, 3), (7, 7)])
def test_check_int_takes_integral_floats_as_ints(value, expected):
    out = check_int("start_tokens", value, 1, "Pass e.g. start_tokens=1_000_000.")
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [1.5, math.nan, math.inf, True, "5", 0.0, None])
def test_check_int_refuses_what_is_not_a_whole_number_naming_the_argument(value):
    with pytest.raises(
        ValueError, match=r"^`start_tokens` must be an int >= 1, got .+ Pass e\.g\."
    ):
        check_int("start_tokens", value, 1, "Pass e.g. start_tokens=1_000_000.")


def test_the_monitor_takes_token_counts_written_as_floats():
    mon = OvertrainingMonitor(
        batches(2), points_per_decade=4, start_tokens=1e6, token_offset=2e3, reference_batches=2.0
    )
    assert mon.cadence.start_tokens == 1_000_000 and type(mon.cadence.start_tokens) is int
    assert mon.token_offset == 2000 and type(mon.token_offset) is int
    assert mon.reference_batches == 2 and type(mon.reference_batches) is int
    with pytest.raises(ValueError, match=r"`start_tokens` must be an int >= 1, got 1\.5"):
        OvertrainingMonitor(batches(2), points_per_decade=4, start_tokens=1.5)


def test_points_per_decade_without_start_tokens_starts_at_1m():
    mon = OvertrainingMonitor(batches(2), points_per_decade=4)
    assert mon.cadence.start_tokens == 1_000_000
    assert "from 1,000,000" in mon.config()["cadence"]


# ---------------------------------------------------------------------- reference_tokens
def test_reference_tokens_takes_whole_batches_until_the_budget_is_reached():
    data = batches(10)  # 2 x 32 = 64 tokens a batch
    for budget, expected in ((64, 1), (65, 2), (200, 4), (10_000, 10)):
        taken, weights = take_reference_set(
            TokenBudget(data, budget, count_tokens), None, count_tokens
        )
        assert len(taken) == expected and sum(weights) == 64 * expected
        assert all(a is b for a, b in zip(taken, data))  # the leading batches, in order


def test_reference_tokens_on_the_monitor_sizes_the_set_in_a_real_fit(tmp_path, code_text):
    loader = DataLoader(ByteWindows(code_text[-40_000:], CONTEXT), batch_size=3)
    mon = OvertrainingMonitor(
        loader,
        reference_tokens=500,  # 96 tokens a batch: 6 batches hold 576
        every_n_steps=1,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
        dirpath=tmp_path / "mon",
    )
    make_trainer(tmp_path, [mon], max_steps=1).fit(make_module(), train_loader(code_text))
    assert mon.reference_tokens == 576 and mon.config()["reference_batches"] == 6
    assert len(mon.history) == 1 and math.isfinite(mon.history[0]["reference_loss"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"reference_batches": 4, "reference_tokens": 8192},
            r"Pass `reference_batches` or `reference_tokens`, not both, got"
            r" reference_batches=4 and reference_tokens=8192",
        ),
        ({"reference_tokens": 0}, r"`reference_tokens` must be an int >= 1, got 0\. Pass"),
        ({"reference_tokens": 81.5}, r"`reference_tokens` must be an int >= 1, got 81\.5"),
    ],
)
def test_bad_reference_sizes_are_refused_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OvertrainingMonitor(batches(2), every_n_steps=1, **kwargs)


# ---------------------------------------------------------------------- loss messages
def check(loss_fn, batch):
    module = make_module()
    with pytest.raises(ValueError) as info:
        check_loss(module, ModelBackup(module), batch, loss_fn, "reference_data")
    return str(info.value)


def test_a_failing_user_loss_gets_a_message_about_that_loss():
    def my_pair_loss(module, batch):
        return module(batch[0]).mean()  # a GPT-2 forward takes no positional tensor like this

    ids = torch.zeros(2, CONTEXT, dtype=torch.long)
    message = check(my_pair_loss, (ids, ids))
    assert message.startswith("Your `loss_fn` (")
    assert "my_pair_loss" in message and "failed on the first batch of `reference_data`" in message
    assert f"(tuple of (Tensor[2, {CONTEXT}], Tensor[2, {CONTEXT}]))" in message
    # Nothing about the default transformers loss the user did not pass.
    assert "module(**batch).loss" not in message and "transformers" not in message
    assert one_period_at_the_end(message)


def test_the_default_loss_on_a_tuple_batch_says_it_once_with_one_period():
    ids = torch.zeros(2, CONTEXT, dtype=torch.long)
    message = check(transformers_loss, (ids, ids))
    assert "the default, `module(**batch).loss` (the transformers convention)" in message
    assert "needs a dict batch, got tuple" in message
    assert message.count("loss_fn=") == 1, message  # the advice, once
    assert one_period_at_the_end(message) and ".." not in message


def test_the_default_loss_on_a_dict_batch_the_model_rejects_keeps_its_advice():
    message = check(transformers_loss, {"input_ids": torch.zeros(2, CONTEXT), "oops": 1})
    assert message.count("loss_fn=lambda module, batch") == 1
    assert "dict with keys ['input_ids', 'oops']" in message
    assert one_period_at_the_end(message)


@pytest.mark.parametrize("batch", [("a", "b"), {"x": torch.zeros(2)}, 3.0])
def test_a_batch_without_tokens_to_count_gets_one_advice_and_one_period(batch):
    with pytest.raises(TypeError) as info:
        count_tokens(batch)
    message = str(info.value)
    assert f"({describe_batch(batch)})" in message
    assert message.count("tokens_fn=") == 1 and one_period_at_the_end(message)
    assert re.search(r"first\s+tensor of a tuple", message)


# ---------------------------------------------------------------------- messages (a test per case)
class Texts(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> str:
        return f"held-out sentence {i}"


def test_a_reference_loader_of_untokenized_text_is_named_with_the_fix(tmp_path, code_text):
    mon = OvertrainingMonitor(DataLoader(Texts(), batch_size=4), every_n_steps=1)
    with pytest.raises(ValueError) as info:
        make_trainer(tmp_path, [mon], max_steps=1).fit(make_module(), train_loader(code_text))
    message = str(info.value)
    assert message.startswith("`reference_data` batch 0 holds text (['held-out sentence 0'")
    assert "not token ids" in message and "tokenizer(texts, return_tensors='pt'" in message


def test_untokenized_text_with_reference_tokens_gets_the_same_message():
    budget = TokenBudget(DataLoader(Texts(), batch_size=4), 100, count_tokens)
    with pytest.raises(ValueError, match=r"`reference_data` batch 0 holds text"):
        take_reference_set(budget, None, count_tokens)


def test_one_probe_not_in_a_list_is_named_with_the_fix():
    with pytest.raises(ValueError) as info:
        OvertrainingMonitor(batches(2), every_n_steps=1, probes=NoiseProbe())
    assert str(info.value) == (
        "`probes` must be a list of probes, got one probe, NoiseProbe. Pass it in a list:"
        " probes=[NoiseProbe(...)]."
    )


def test_two_probes_of_one_name_are_named_by_that_name():
    with pytest.raises(ValueError) as info:
        OvertrainingMonitor(batches(2), every_n_steps=1, probes=[NoiseProbe(), NoiseProbe()])
    message = str(info.value)
    assert "names ['noise', 'noise'] ('noise' more than once)" in message
    assert "object at 0x" not in message and "NoiseProbe(gammas=(0.25, 0.5, 1.0))" in message


def test_reference_tokens_beyond_the_data_warns_with_what_exists_and_the_fix():
    with pytest.warns(UserWarning) as caught:
        taken, weights = take_reference_set(
            TokenBudget(batches(4), 10**6, count_tokens), None, count_tokens
        )
    assert sum(weights) == 256 and len(taken) == 4
    assert str(caught[0].message) == (
        "`reference_tokens=1000000` asks for more tokens than `reference_data` holds (256"
        " tokens in 4 batch(es)): the reference set is all of it. Pass reference_tokens=256 or"
        " less, or more held-out data."
    )


@pytest.mark.parametrize("gammas, shown", [("0.5", "'0.5'"), (b"x", "b'x'")])
def test_gammas_as_a_string_or_bytes_is_refused_as_a_whole(gammas, shown):
    with pytest.raises(ValueError) as info:
        NoiseProbe(gammas=gammas)
    message = str(info.value)
    assert message.startswith("`gammas` must be a non-empty sequence of numbers > 0")
    assert f"got {shown}." in message and "gammas=(0.25, 0.5, 1.0)" in message
    assert "('0', '.', '5')" not in message and "120" not in message


# ---------------------------------------------------------------------- no hang on plausible input
class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield {"input_ids": torch.zeros(2, CONTEXT, dtype=torch.long)}


def test_an_endless_reference_loader_without_a_size_is_refused_naming_the_size_arguments(
    tmp_path, code_text
):
    mon = OvertrainingMonitor(DataLoader(Endless(), batch_size=None), every_n_steps=1)
    with pytest.raises(ValueError) as info:
        make_trainer(tmp_path, [mon], max_steps=1).fit(make_module(), train_loader(code_text))
    message = str(info.value)
    assert "`reference_data` has no length and yielded more than 4,096 batches" in message
    assert "reference_tokens=8192" in message and "reference_batches=N" in message


def test_an_endless_reference_loader_with_reference_tokens_is_read_up_to_the_budget():
    taken, weights = take_reference_set(
        TokenBudget(DataLoader(Endless(), batch_size=None), 8192, count_tokens),
        None,
        count_tokens,
    )
    assert sum(weights) == 8192 and len(taken) == 128


@pytest.mark.parametrize("value", [1e30, 1001])
def test_points_per_decade_has_an_upper_bound(value):
    with pytest.raises(ValueError, match=r"`points_per_decade` must be an int from 1 to 1,000"):
        OvertrainingMonitor(batches(2), points_per_decade=value)


@pytest.mark.parametrize(
    "kwargs", [{"every_n_tokens": 1}, {"points_per_decade": 1000, "start_tokens": 1}]
)
def test_the_cadence_works_in_bounded_steps_however_far_the_tokens_jump(kwargs):
    from lightning_overtrain.callbacks.cadence import Cadence

    cadence = Cadence(**kwargs)
    calls = 0
    threshold = cadence.threshold

    def counted(index: int) -> float:
        nonlocal calls
        calls += 1
        return threshold(index)

    cadence.threshold = counted  # type: ignore[method-assign]
    assert cadence.due(1, 10**15)  # a resume with a huge token_offset
    assert calls < 10 and cadence.threshold(cadence.next_index) > 10**15
    assert cadence.threshold(cadence.next_index - 1) <= 10**15
    assert not cadence.due(2, 10**15)


def test_a_bad_token_id_in_a_later_reference_batch_is_named_by_its_index(tmp_path, code_text):
    ref = batches(4)
    ref[2] = {"input_ids": torch.full((2, CONTEXT), 10_000, dtype=torch.long)}  # > vocabulary
    mon = OvertrainingMonitor(ref, every_n_steps=1)
    with pytest.raises(
        ValueError, match=r"failed on batch 2 \(counting from 0\) of `reference_data`"
    ):
        make_trainer(tmp_path, [mon], max_steps=1).fit(make_module(), train_loader(code_text))


def test_an_endless_eval_loader_is_refused_naming_eval_batches():
    from lightning_overtrain.engine.data import take_batches

    with pytest.raises(ValueError, match=r"`eval_data` has no length .* Pass eval_batches=N"):
        take_batches(DataLoader(Endless(), batch_size=None), None, "eval_data")
