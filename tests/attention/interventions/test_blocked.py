"""The blocked path equals the dense one and never builds a [T, S] array; jit; auto."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import interventions as ivs
from tests.attention.interventions import fixtures as fx

L = 96  # T = S = 96, second passes in blocks of 32 rows


def _site(t, s, *, window=None, hidden=None, pad=5):
  kv_valid = np.ones((2, s), bool)
  kv_valid[1, :pad] = False
  kv_pos = np.broadcast_to(np.arange(s), (2, s)).copy()
  kv_pos[1] -= pad
  q_pos = kv_pos[:, s - t:]
  return ivs.AttentionSite(
      layer=1, num_layers=3, q_positions=jnp.asarray(q_pos, jnp.int32),
      kv_positions=jnp.asarray(kv_pos, jnp.int32), kv_valid=jnp.asarray(kv_valid),
      window=window, hidden=hidden, scale=fx.SCALE)


def _combos():
  rng = np.random.default_rng(20)
  queries = jnp.asarray(rng.uniform(size=(2, L)) < 0.3)
  keys = jnp.asarray(rng.uniform(size=(2, L)) < 0.2)
  targets = np.zeros((2, L), bool)
  targets[:, 10:60] = True
  hidden = rng.normal(size=(2, L, 512))
  hidden[:, [0, 30], 9] = 500.0
  c = jnp.asarray(rng.uniform(0.2, 2.0, size=(2, L)), jnp.float32)
  clean = jnp.asarray(rng.normal(size=(2, L, 4, 8)), jnp.float32)
  return [
      ('act', _site(L, L, window=40), (
          ivs.Temperature(temperature=1.7, heads=(1, 2)),
          ivs.Knockout(queries=queries, keys=keys, heads=(0, 1)),
          ivs.ReweightColumns(c=c, heads=(2, 3)),
          ivs.ACT(tau=0.05, heads=(0, 1, 2)),
          ivs.HeadScaling(alpha=2.0, heads=(3,)),
          ivs.PatchHeadOutputs(outputs=clean, heads=(0,),
                               positions=jnp.asarray(rng.uniform(size=(2, L)) < .5)))),
      ('var', _site(L, L, hidden=jnp.asarray(hidden, jnp.float32)), (
          ivs.Knockout(queries=queries, keys=keys),
          ivs.VAR(targets=jnp.asarray(targets), sink_dims=(9,), heads=(1, 2, 3),
                  min_target_mass=0.3))),
      # 32 queries at the end of a 96-key cache (q_positions > 0).
      ('softpag', _site(32, L), (
          ivs.SoftPAG(s=0.6, heads=(0, 2)), ivs.HeadMask(heads=(3,)))),
  ]


def test_blocked_equals_dense():
  for name, site, edits in _combos():
    t = site.q_positions.shape[1]
    q, k, v = fx.qkv(21, t=t, s=L, sink_keys=(0, 30))
    dense, _ = ivs.attend(q, k, v, site, edits, method='dense')
    blocked, _ = ivs.attend(q, k, v, site, edits, method='blocked', block=32)
    np.testing.assert_allclose(blocked, dense, atol=1e-5, rtol=1e-5, err_msg=name)


def _avals(jaxpr):
  """Every intermediate's aval, through nested jaxprs (scan, cond, custom_vjp, pjit)."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _avals(inner)


def _has_square(fn, t, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return any(len(getattr(a, 'shape', ())) >= 2 and tuple(a.shape[-2:]) == (t, t)
             for a in _avals(jaxpr.jaxpr))


def test_blocked_builds_no_t_by_s_array():
  t = 512
  rng = np.random.default_rng(22)
  q, k, v = fx.qkv(23, b=1, t=t, n=2, kh=1)
  site = ivs.AttentionSite.default(1, t, scale=fx.SCALE, layer=0, num_layers=2,
                                   hidden=jnp.asarray(rng.normal(size=(1, t, 8)),
                                                      jnp.float32))
  sets = jnp.asarray(rng.uniform(size=(1, t)) < 0.5)
  for edits in ((ivs.Temperature(temperature=2.0, heads=(1,)),
                 ivs.Knockout(queries=sets, keys=~sets), ivs.ACT()),
                (ivs.VAR(targets=sets, sink_dims=(3,)), ivs.HeadMask(heads=(0,))),
                (ivs.SoftPAG(s=0.5),)):
    fn = jax.jit(lambda q, k, v, site, edits: ivs.attend(
        q, k, v, site, edits, method='blocked', block=128)[0])
    assert not _has_square(fn, t, q, k, v, site, edits), edits
  # The check can fail: the dense path does build one.
  dense = jax.jit(lambda q, k, v, site: ivs.attend(q, k, v, site, (ivs.ACT(),),
                                                   method='dense')[0])
  assert _has_square(dense, t, q, k, v, site)


def test_jit_with_interventions_as_arguments_and_auto():
  q, k, v = fx.qkv(24)
  site, _ = fx.site()
  rng = np.random.default_rng(25)
  fn = jax.jit(ivs.attend, static_argnames=('method', 'block'))
  for _ in range(2):  # new token sets: same compiled function (leaves are traced)
    ko = ivs.Knockout(queries=jnp.asarray(rng.uniform(size=(fx.B, fx.T)) < 0.5),
                      keys=jnp.asarray(rng.uniform(size=(fx.B, fx.T)) < 0.5))
    edits = (ko, ivs.ACT(heads=(1,)))
    got, _ = fn(q, k, v, site, edits, None, method='dense')
    want, _ = ivs.attend(q, k, v, site, edits, method='dense')
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  leaves = jax.tree_util.tree_leaves(edits)
  assert len(leaves) == 2  # the two token sets; tau, beta, heads are static
  # 'auto' goes dense for what blocked cannot do; blocked refuses it.
  assert 'two probability edits' in ivs.blocked_unsupported(
      (ivs.ACT(), ivs.SoftPAG()), None)
  assert ivs.blocked_unsupported((ivs.Temperature(temperature=2.0), ko, ivs.ACT()),
                                 ivs.Record(head_outputs=True)) is None
  with pytest.raises(ValueError, match='two probability edits'):
    ivs.attend(q, k, v, site, (ivs.ACT(), ivs.SoftPAG()), method='blocked')
  auto, _ = ivs.attend(q, k, v, site, (ivs.ACT(), ivs.SoftPAG()))
  dense, _ = ivs.attend(q, k, v, site, (ivs.ACT(), ivs.SoftPAG()), method='dense')
  np.testing.assert_array_equal(auto, dense)
  with pytest.raises(ValueError, match='block'):
    ivs.attend(q, k, v, site, (), method='blocked', block=512)
