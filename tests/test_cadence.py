import pytest

from lightning_overtrain.callbacks.cadence import DEFAULT_START_TOKENS, Cadence


def test_every_n_steps_is_due_on_multiples_only():
    cadence = Cadence(every_n_steps=3)
    assert [s for s in range(10) if cadence.due(step=s, tokens=0)] == [3, 6, 9]


def test_every_n_tokens_fires_once_per_crossed_multiple():
    cadence = Cadence(every_n_tokens=100)
    fired = [t for t in (50, 100, 150, 199, 350, 399, 400) if cadence.due(step=1, tokens=t)]
    # 350 passes both 200 and 300 at once: one snapshot, and the next is due at 400.
    assert fired == [100, 350, 400]


def test_log_spaced_tokens_hit_exact_decades():
    cadence = Cadence(points_per_decade=4, start_tokens=1000)
    due = [t for t in range(0, 100_001, 1) if cadence.due(step=1, tokens=t)]
    assert due[0] == 1000 and 10_000 in due and 100_000 in due
    assert len(due) == 9  # 2 decades x 4 points + the start


def test_cadence_state_round_trips():
    first = Cadence(points_per_decade=2, start_tokens=10)
    for t in (10, 40, 100):
        first.due(step=1, tokens=t)
    second = Cadence(points_per_decade=2, start_tokens=10)
    second.load_state_dict(first.state_dict())
    assert [second.due(1, t) for t in (300, 320, 1000)] == [False, True, True]
    assert second.next_index == first.next_index + 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one snapshot cadence, got none"),
        ({"every_n_steps": 10, "every_n_tokens": 100}, "exactly one snapshot cadence"),
        ({"every_n_steps": 0}, "`every_n_steps` must be an int >= 1, got 0"),
        ({"every_n_tokens": 2.5}, "`every_n_tokens` must be an int >= 1, got 2.5"),
        ({"every_n_tokens": 1e5 + 0.5}, "`every_n_tokens` must be an int >= 1, got 100000.5"),
        ({"points_per_decade": 4, "start_tokens": 1.5}, "`start_tokens` must be an int >= 1"),
        ({"points_per_decade": 4, "start_tokens": float("nan")}, "`start_tokens` must be an int"),
        (
            {"points_per_decade": 4, "start_tokens": -5},
            "`start_tokens` must be an int >= 1, got -5",
        ),
        ({"every_n_steps": 5, "start_tokens": 100}, "only applies to `points_per_decade`"),
        ({"every_n_steps": True}, "`every_n_steps` must be an int >= 1, got True"),
    ],
)
def test_bad_cadence_is_rejected_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        Cadence(**kwargs)


def test_points_per_decade_alone_starts_at_the_documented_default():
    cadence = Cadence(points_per_decade=4)
    assert cadence.start_tokens == DEFAULT_START_TOKENS == 1_000_000
    assert [cadence.due(1, t) for t in (999_999, 1_000_000)] == [False, True]
    assert cadence.describe() == "4 per decade of tokens from 1,000,000"


def test_integral_floats_are_taken_as_ints():
    cadence = Cadence(points_per_decade=4.0, start_tokens=1e6)
    assert (cadence.points_per_decade, cadence.start_tokens) == (4, 1_000_000)
    assert type(cadence.start_tokens) is int and type(cadence.points_per_decade) is int
    assert Cadence(every_n_tokens=1e8).every_n_tokens == 100_000_000
