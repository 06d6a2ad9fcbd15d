"""Inference-time attention interventions per (layer, head), and the `attend` hook point.

`attend(q, k, v, site, interventions, record)` is the hook a model calls in place of
`attention.dot_product_attention` to edit attention logits, probabilities or head
outputs without touching weights, and to record them (see
`attention.interventions.hook_point`).
"""

from attention.interventions.base import AttentionSite
from attention.interventions.base import Intervention
from attention.interventions.base import Record
from attention.interventions.base import array_field
from attention.interventions.hook_point import attend
from attention.interventions.hook_point import blocked_unsupported
from attention.interventions.hook_point import dense_logits
from attention.interventions.hook_point import masked_softmax

__all__ = [
    'AttentionSite',
    'Intervention',
    'Record',
    'array_field',
    'attend',
    'blocked_unsupported',
    'dense_logits',
    'masked_softmax',
]
