"""The linear-attention family: naive (oracle), recurrent (decoding) and chunked forms.

As flash-linear-attention organises it: per variant a naive quadratic form, a
`lax.scan` recurrence and a chunked parallel form that agree, all [B, T, N, H], with
initial state in / final state out and segment ids that reset the state exactly.
`linear_attention`, `lightning_attention`, `retention`, `gated_linear_attention` pick
an implementation (`implementation=None | 'xla' | 'pallas_tpu' | 'pallas_gpu'`; the
chunked XLA form on CPU, the Pallas chunk kernel of kernels/pallas/linear.py on TPU /
GPU where it supports the inputs).

* `linear_transformer`: linear attention with feature maps (elu+1, relu,
  identity, exp, callable), normalised or not, causal or not (Katharopoulos et
  al. 2020).
* `lightning`: per-head decay exp(-s_h) with ALiBi slopes (TransNormerLLM,
  Lightning Attention-2).
* `retnet`: retention (RetNet), a fixed per-head decay, no normalisation.
* `gla`: gated linear attention, data-dependent decay per head or per key dimension.
* `layers`: Flax NNX token mixers owning the projections (and GLA's gate).
* `inline_attention`: InLine, injective linear attention + local term ("Bridging
  the Divide", Han et al. 2024).
* `agent_attention`: agent attention through pooled agent tokens (Han et al. 2024).
* `flowformer`: flow attention with conservation flows (Wu et al. 2022).
* `lightnet`: LightNet's additive recurrence, MD-LRPE, MD-TPE (Qin et al. 2024).
(`attention.focal_modulation` holds FocalNets' attention-free token mixer.)
"""

from attention.linear._dispatch import IMPLEMENTATIONS
from attention.linear.gla import chunked_gated_linear_attention
from attention.linear.gla import gated_linear_attention
from attention.linear.gla import gla_log_gates
from attention.linear.gla import naive_gated_linear_attention
from attention.linear.gla import recurrent_gated_linear_attention
from attention.linear.lightning import alibi_slopes
from attention.linear.lightning import chunked_lightning_attention
from attention.linear.lightning import lightning_attention
from attention.linear.lightning import lightning_slopes
from attention.linear.lightning import naive_lightning_attention
from attention.linear.lightning import recurrent_lightning_attention
from attention.linear.linear_transformer import FEATURE_MAPS
from attention.linear.linear_transformer import chunked_linear_attention
from attention.linear.linear_transformer import linear_attention
from attention.linear.linear_transformer import naive_linear_attention
from attention.linear.linear_transformer import recurrent_linear_attention
from attention.linear.retnet import chunked_retention
from attention.linear.retnet import naive_retention
from attention.linear.retnet import recurrent_retention
from attention.linear.retnet import retention
from attention.linear.retnet import retention_gammas

# Flax NNX layers (imported last: they use the functional forms above).
from attention.linear.layers import GatedLinearAttention  # pylint: disable=g-bad-import-order
from attention.linear.layers import LightningAttention
from attention.linear.layers import LinearAttention
from attention.linear.layers import Retention

# Vision-style and conservation-flow variants (each module holds its NNX layer;
# `agent_attention` / `inline_attention` stay module names, their functions inside).
from attention.linear.agent_attention import AgentAttention  # pylint: disable=g-bad-import-order
from attention.linear.flowformer import FlowAttention
from attention.linear.flowformer import FlowState
from attention.linear.flowformer import flow_attention
from attention.linear.flowformer import recurrent_flow_attention
from attention.linear.inline_attention import InLineAttention
from attention.linear.inline_attention import InLineState
from attention.linear.inline_attention import naive_inline_attention
from attention.linear.inline_attention import recurrent_inline_attention
from attention.linear.lightnet import MDTPE
from attention.linear.lightnet import LightNetAttention
from attention.linear.lightnet import lightnet_attention
from attention.linear.lightnet import md_lrpe
from attention.linear.lightnet import md_tpe
from attention.linear.lightnet import naive_lightnet_attention
from attention.linear.lightnet import recurrent_lightnet_attention
