"""Inference-time attention interventions per (layer, head), and the `attend` hook point.

`attend(q, k, v, site, interventions, record)` is the hook a model calls in place of
`attention.dot_product_attention` to edit attention logits, probabilities or head
outputs without touching weights, and to record them (`hook_point`). The methods:
ACT (`act`), VAR (`attention_redistribution`), head scaling / masking / temperature /
SoftPAG (`head_interventions`), knockout (`knockout`), record-and-replace and
activation patching (`replacement`); `blocked` holds the exact forms that never build
a T x S array; `config.parse_interventions` reads them from a flag string.
"""

from attention.interventions.act import ACT
from attention.interventions.act import act_calibrate
from attention.interventions.act import act_sink_scores
from attention.interventions.act import act_sinks
from attention.interventions.attention_redistribution import VAR
from attention.interventions.attention_redistribution import massive_activation_dims
from attention.interventions.attention_redistribution import massive_activation_ratio
from attention.interventions.attention_redistribution import var_redistribute
from attention.interventions.attention_redistribution import var_sink_tokens
from attention.interventions.base import AttentionSite
from attention.interventions.base import Intervention
from attention.interventions.base import Record
from attention.interventions.base import array_field
from attention.interventions.config import parse_interventions
from attention.interventions.head_interventions import HeadMask
from attention.interventions.head_interventions import HeadScaling
from attention.interventions.head_interventions import SoftPAG
from attention.interventions.head_interventions import Temperature
from attention.interventions.head_interventions import guided
from attention.interventions.head_interventions import head_divergence_scores
from attention.interventions.head_interventions import identity_map
from attention.interventions.head_interventions import softpag_probs
from attention.interventions.head_interventions import top_heads
from attention.interventions.hook_point import attend
from attention.interventions.hook_point import blocked_unsupported
from attention.interventions.hook_point import dense_logits
from attention.interventions.hook_point import masked_softmax
from attention.interventions.knockout import Knockout
from attention.interventions.knockout import knockout_layers
from attention.interventions.knockout import knockout_logits
from attention.interventions.replacement import PatchHeadOutputs
from attention.interventions.replacement import ReplaceProbs
from attention.interventions.replacement import ReweightColumns
from attention.interventions.replacement import patching_effect
from attention.interventions.replacement import reweight_columns

__all__ = [
    'ACT',
    'AttentionSite',
    'HeadMask',
    'HeadScaling',
    'Intervention',
    'Knockout',
    'PatchHeadOutputs',
    'Record',
    'ReplaceProbs',
    'ReweightColumns',
    'SoftPAG',
    'Temperature',
    'VAR',
    'act_calibrate',
    'act_sink_scores',
    'act_sinks',
    'array_field',
    'attend',
    'blocked_unsupported',
    'dense_logits',
    'guided',
    'head_divergence_scores',
    'identity_map',
    'knockout_layers',
    'knockout_logits',
    'masked_softmax',
    'massive_activation_dims',
    'massive_activation_ratio',
    'parse_interventions',
    'patching_effect',
    'reweight_columns',
    'softpag_probs',
    'top_heads',
    'var_redistribute',
    'var_sink_tokens',
]
