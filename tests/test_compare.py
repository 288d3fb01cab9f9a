"""moe_fusion.compare: the one comparison (proof, check, fuzzer) and its NaN/±Inf policy, element by element."""

import numpy as np
import pytest

from moe_fusion.compare import compare

NAN, INF = np.nan, np.inf


@pytest.mark.parametrize(
    ("want", "got", "ok"),
    [
        ([NAN, 1.0], [NAN, 1.0], True),  # NaN where the original has NaN
        ([INF, 1.0], [INF, 1.0], True),  # the same infinity
        ([-INF, 1.0], [-INF, 1.0], True),
        ([1.0, 1.0], [NAN, 1.0], False),  # NaN in the replacement only
        ([NAN, 1.0], [1.0, 1.0], False),  # a number where the original has NaN (issue 18's hidden NaN row)
        ([INF, 1.0], [-INF, 1.0], False),  # the other infinity
        ([INF, 1.0], [NAN, 1.0], False),
        ([NAN, 1.0], [INF, 1.0], False),
        ([INF, 1.0], [1e300, 1.0], False),  # a huge number is not Inf, whatever the tolerance
        ([1.0, 1.0], [INF, 1.0], False),
    ],
)
def test_non_finite_values_must_match_exactly(want, got, ok):
    result = compare(np.array(want), np.array(got), rtol=1e6, atol=1e6)  # any tolerance: the policy is exact
    assert result.ok is ok
    assert result.nonfinite_mismatches == (0 if ok else 1)
    if not ok:
        assert result.worst == (0,) and result.max_abs == INF and "NaN/Inf must match" in result.describe()


def test_finite_tolerance_is_relative_to_the_originals_finite_scale():
    want = np.array([NAN, INF, 2.0, -4.0])  # the scale is 4: NaN and Inf do not enter it
    assert compare(want, np.array([NAN, INF, 2.0, -4.0 + 3.9e-4]), rtol=1e-4).ok
    result = compare(want, np.array([NAN, INF, 2.0 + 4.1e-4, -4.0]), rtol=1e-4)
    assert not result.ok and result.scale == 4.0 and result.worst == (2,) and result.limit == pytest.approx(4e-4)
    assert "max |diff| 0.00041" in result.describe()


def test_all_nan_original_matched_by_all_nan_replacement_passes():
    assert compare(np.full((2, 3), NAN), np.full((2, 3), NAN), rtol=1e-4).ok


def test_shapes_must_agree_unless_only_the_count_is_asked():
    assert compare(np.zeros((2, 3)), np.zeros(6), rtol=1e-4).shape_error == "shape [6] instead of [2, 3]"
    assert compare(np.zeros((2, 3)), np.zeros(6), rtol=1e-4, same_size=True).ok
    assert not compare(np.zeros((2, 3)), np.zeros(5), rtol=1e-4, same_size=True).ok
