"""The shared comparison helper can fail: a planted NaN, a moved infinity, one element off."""

import pytest
import torch

from tests.tolerances import assert_close


def test_a_planted_nan_fails_even_when_the_reference_has_non_finite_values():
    expected = torch.tensor([1.0, float("inf"), 3.0])
    actual = torch.tensor([float("nan"), float("inf"), 3.0])  # the old helper compared only .all()
    with pytest.raises(AssertionError, match=r"non-finite values at other positions.*at \(0,\)"):
        assert_close(actual, expected, torch.float32)


def test_non_finite_values_must_match_in_place_and_kind():
    expected = torch.tensor([float("inf"), 2.0, float("nan")])
    assert_close(expected.clone(), expected, torch.float32)  # identical specials pass
    with pytest.raises(AssertionError, match="inf sign or NaN"):
        assert_close(torch.tensor([-float("inf"), 2.0, float("nan")]), expected, torch.float32)
    with pytest.raises(AssertionError, match="other positions"):
        assert_close(torch.tensor([float("inf"), float("nan"), 2.0]), expected, torch.float32)


def test_one_element_beyond_the_table_fails_with_where_it_is():
    expected = torch.ones(4, 5)
    actual = expected.clone()
    actual[2, 3] += 1e-3  # far above the fp32 row (1e-5 + 1e-5·|1|)
    with pytest.raises(AssertionError, match=r"1/20 elements off.*at \(2, 3\)"):
        assert_close(actual, expected, torch.float32)
    actual[2, 3] = 1 + 1e-6
    assert_close(actual, expected, torch.float32)
