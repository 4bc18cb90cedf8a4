"""The test helpers themselves: assert_close reports, numerical_grad restores, bf16_round rounds."""
import numpy as np
import pytest

from llmpy.testing import assert_close, bf16_round, error_budget, numerical_grad


def test_assert_close_reports_the_worst_element():
    expected = np.zeros((2, 3))
    actual = expected.copy()
    actual[1, 2] = 0.5
    assert_close(actual, expected, atol=0.5)
    with pytest.raises(AssertionError, match=r"x: 1 of 6 .* max abs diff 0.5 at index \(1, 2\)"):
        assert_close(actual, expected, atol=0.1, name="x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(actual, expected[0])
    assert_close(np.array([np.nan, np.inf]), np.array([np.nan, np.inf]))
    with pytest.raises(AssertionError):
        assert_close(np.array([np.nan]), np.array([0.0]), atol=1.0)


def test_numerical_grad_restores_x(rng):
    x = rng.standard_normal(4)
    x0 = x.copy()
    assert_close(numerical_grad(lambda: (x ** 3).sum(), x), 3 * x0 ** 2, atol=1e-8)
    assert np.array_equal(x, x0)


def test_bf16_round_matches_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    special = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 3.3895314e38, 1e-40, np.nan], np.float32)
    ties = (np.arange(1, 9, dtype=np.uint32) * 0x10000 + 0x3F808000).view(np.float32)  # exactly halfway
    x = np.concatenate([rng.standard_normal(10000, dtype=np.float32) * 100, special, ties])
    assert_close(bf16_round(x), x.astype(ml_dtypes.bfloat16).astype(np.float32), name="bf16")
    assert bf16_round(x).dtype == np.float32


def test_error_budget():
    exact, lowp = np.zeros(3), np.array([0.0, 1e-3, 0.0])
    assert error_budget(np.array([0.0, 0.0, 1.5e-3]), exact, lowp) == pytest.approx(1.5e-3)
    with pytest.raises(AssertionError, match="budget"):
        error_budget(np.array([0.0, 0.0, 3e-3]), exact, lowp)


def test_ulp_budget_is_per_element():
    from llmpy.testing import ulp_budget
    exact = np.array([1.5, 0.01, 0.0])
    # 1 bf16 ulp at 1.5 is 2^-7; at 0.01 it is 2^-14
    assert ulp_budget(exact + [2.0**-7, -2.0**-14, 0.0], exact, mantissa_bits=7) == pytest.approx(1.0)
    with pytest.raises(AssertionError, match="1 elements off"):
        ulp_budget(exact + [0.0, 2.0**-13, 0.0], exact, mantissa_bits=7)     # 2 ulps at 0.01
    with pytest.raises(AssertionError, match="index 2"):
        ulp_budget(exact + [0.0, 0.0, 1e-9], exact, mantissa_bits=7)
    assert ulp_budget(exact + [0.0, 0.0, 1e-9], exact, mantissa_bits=7, floor=1e-8) >= 0
