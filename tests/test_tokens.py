import pytest
import torch

from lightning_overtrain.engine.tokens import checked_token_count, count_tokens


def test_counts_unmasked_positions_when_a_mask_is_given():
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]),
    }
    assert count_tokens(batch) == 5


def test_counts_all_input_ids_without_a_mask():
    assert count_tokens({"input_ids": torch.zeros(3, 7, dtype=torch.long)}) == 21


def test_counts_a_tensor_and_the_first_tensor_of_a_tuple():
    assert count_tokens(torch.zeros(2, 5)) == 10
    assert count_tokens((torch.zeros(4, 3), torch.zeros(4, 3))) == 12


def test_unknown_batch_shape_names_tokens_fn():
    with pytest.raises(TypeError, match="tokens_fn"):
        count_tokens({"pixels": torch.zeros(2)})


@pytest.mark.parametrize("bad", [-1, 2.5, "3", None])
def test_tokens_fn_must_return_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="`tokens_fn` must return a non-negative int"):
        checked_token_count(lambda batch: bad, None)


def test_tokens_fn_may_return_a_scalar_tensor():
    assert checked_token_count(lambda batch: torch.tensor(9), None) == 9
