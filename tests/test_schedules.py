"""Schedule values and time grids against the spec's numbers."""
import numpy as np
import pytest

from drdd_jax import schedules


def test_coefficients_match_spec():
  s = schedules.make_schedule(1000, sigma_h=1.0)
  assert s.a.dtype == np.float32 and s.b.dtype == np.float32
  np.testing.assert_allclose(s.a[0], 5.0e-5, rtol=1e-3)
  np.testing.assert_allclose(s.a[999], 0.99365, atol=5e-6)
  np.testing.assert_allclose(s.b[0], 0.0100, atol=5e-5)
  np.testing.assert_allclose(s.b[499], 0.95990, atol=5e-6)
  np.testing.assert_allclose(s.b[999], 0.99998, atol=5e-6)


@pytest.mark.parametrize('sigma_h', [0.8, 1.3])
def test_noise_coefficients_scale_with_sigma_h(sigma_h):
  base = schedules.make_schedule(1000, 1.0)
  s = schedules.make_schedule(1000, sigma_h)
  np.testing.assert_allclose(s.b, sigma_h * base.b, rtol=1e-6)
  np.testing.assert_array_equal(s.a, base.a)


@pytest.mark.parametrize('n, expected', [
    (2, [(999, 499), (499, -1)]),
    (3, [(999, 665), (665, 332), (332, -1)]),
    (10, list(zip(range(999, 0, -100), list(range(899, 0, -100)) + [-1]))),
])
def test_time_grid(n, expected):
  np.testing.assert_array_equal(schedules.time_grid(n, 1000), np.array(expected))


def test_bad_values_name_the_field():
  with pytest.raises(ValueError, match='sigma_h'):
    schedules.make_schedule(1000, sigma_h=0.0)
  with pytest.raises(ValueError, match='steps'):
    schedules.time_grid(0)
