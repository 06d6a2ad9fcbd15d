"""parse_interventions: the flag grammar and its errors."""

import pytest

from attention import interventions as ivs


def test_parse_interventions():
  got = ivs.parse_interventions(
      'act:tau=0.1,beta=0.4,layers=1-2;temperature:t=2,heads=0; head_mask:heads=0|3-4;'
      'head_scaling:alpha=1.5;softpag:s=0.25,layers=5')
  assert len(got) == 5
  act, temp, mask, scale, pag = got
  assert isinstance(act, ivs.ACT) and (act.tau, act.beta, act.layers) == (0.1, 0.4,
                                                                          (1, 2))
  assert act.heads is None
  assert isinstance(temp, ivs.Temperature) and temp.temperature == 2.0
  assert temp.heads == (0,)
  assert isinstance(mask, ivs.HeadMask) and mask.heads == (0, 3, 4)
  assert isinstance(scale, ivs.HeadScaling) and scale.alpha == 1.5
  assert isinstance(pag, ivs.SoftPAG) and (pag.s, pag.layers) == (0.25, (5,))
  assert ivs.parse_interventions('') == ()
  assert ivs.parse_interventions('act')[0].tau == 0.1


@pytest.mark.parametrize('spec,match', [
    ('actt:tau=0.1', "unknown intervention 'actt'"),
    ('act:gamma=1', "unknown key 'gamma'"),
    ('act:tau', 'expected key=value'),
    ('act:tau=high', 'tau must be a number'),
    ('act:tau=0.1,tau=0.2', 'tau given twice'),
    ('act:layers=3-1', 'layers must be ints'),
    ('act:beta=1.5', r'beta must be in \[0.0, 1.0\]'),
    ('temperature:t=0', 'temperature must be positive'),
    ('head_mask:heads=1|1', 'heads must not repeat'),
])
def test_parse_interventions_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    ivs.parse_interventions(spec)
