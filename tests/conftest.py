"""Test setup: 8 simulated CPU devices for sharding tests, LLVM -O0 compiles;
hypothesis profiles."""

import os

# Must happen before JAX initialises its backends.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
# LLVM -O0 for every XLA:CPU compilation of the suite (and of the subprocesses it
# starts, which inherit XLA_FLAGS): the tests' programs are tiny, so compiling them
# is most of their time, and -O0 compiles them about 1.2-1.7x faster. XLA:CPU uses
# no fast-math at either level, so tolerances are unchanged; the benchmarks and
# binaries keep the default outside the tests. An explicit level in XLA_FLAGS wins.
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'

import hypothesis  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

hypothesis.settings.register_profile(
    'ci', max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    'dev', max_examples=30, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


@pytest.fixture(scope='session')
def cpu_devices():
  devices = jax.devices('cpu')
  if len(devices) < 8:
    pytest.skip('needs 8 CPU devices (XLA_FLAGS was set before conftest).')
  return devices[:8]
