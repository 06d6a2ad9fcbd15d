"""Small shared inputs for the intervention tests (one shape, so compilations are shared)."""

import jax.numpy as jnp
import numpy as np

from attention import interventions as ivs
from tests.attention.interventions import numpy_oracle as npo

B, T, N, K, H = 2, 12, 4, 2, 8
SCALE = 0.5


def qkv(seed=0, b=B, t=T, s=None, n=N, kh=K, h=H, sink_keys=(0, 3)):
  """Random q, k, v (float32); keys in `sink_keys` get large logits (attention sinks)."""
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, h))
  k = rng.normal(size=(b, s, kh, h))
  v = rng.normal(size=(b, s, kh, h))
  q[..., 0] += 2.0
  for j in sink_keys:
    if j < s:
      k[:, j, :, 0] += 3.0
  return (jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
          jnp.asarray(v, jnp.float32))


def site(*, layer=0, num_layers=3, pad=2, window=None, hidden=None, b=B, t=T):
  """(site, numpy visibility [B, 1, T, T]): batch row 1 has `pad` left-padding keys
  (its positions start at 0 after them)."""
  kv_valid = np.ones((b, t), bool)
  pos = np.broadcast_to(np.arange(t), (b, t)).copy()
  if b > 1 and pad:
    kv_valid[1, :pad] = False
    pos[1] = np.arange(t) - pad
  st = ivs.AttentionSite(
      layer=layer, num_layers=num_layers, q_positions=jnp.asarray(pos, jnp.int32),
      kv_positions=jnp.asarray(pos, jnp.int32), kv_valid=jnp.asarray(kv_valid),
      window=window, hidden=hidden, scale=SCALE)
  return st, npo.visible(pos, pos, kv_valid, window)


def base_probs(q, k, vis):
  """NumPy float64 probabilities of the unedited call."""
  z = npo.logits(q, k, SCALE)
  return npo.softmax(z, np.broadcast_to(vis, z.shape))
