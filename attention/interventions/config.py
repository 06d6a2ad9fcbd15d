"""`parse_interventions`: interventions from a flag string, for the binaries.

Grammar: items separated by ';', each `name[:key=value,key=value,...]`, e.g.

    act:tau=0.1,beta=0.4,layers=1-2;temperature:t=2,heads=0

`layers` / `heads` take ints, inclusive ranges `a-b`, or several joined by '|'
(`heads=0|3-5`). Only the interventions whose parameters are numbers can be written
this way; those that take token sets or arrays (VAR, knockout, replacement,
patching) are built in code.
"""

from __future__ import annotations

from typing import Any, Callable

from attention.interventions import act
from attention.interventions import base
from attention.interventions import head_interventions as heads_lib

__all__ = ['parse_interventions', 'PARSABLE']

# name -> (class, {flag key: constructor argument}).
PARSABLE: dict[str, tuple[Callable[..., base.Intervention], dict[str, str]]] = {
    'act': (act.ACT, {'tau': 'tau', 'beta': 'beta'}),
    'temperature': (heads_lib.Temperature, {'t': 'temperature'}),
    'head_mask': (heads_lib.HeadMask, {}),
    'head_scaling': (heads_lib.HeadScaling, {'alpha': 'alpha'}),
    'softpag': (heads_lib.SoftPAG, {'s': 's'}),
}
_SELECT = ('layers', 'heads')


def _indices(item: str, key: str, text: str) -> tuple[int, ...]:
  out = []
  for part in text.split('|'):
    part = part.strip()
    try:
      if '-' in part:
        lo, hi = (int(x) for x in part.split('-', 1))
        if hi < lo:
          raise ValueError
        out.extend(range(lo, hi + 1))
      else:
        out.append(int(part))
    except ValueError:
      raise ValueError(f'{item!r}: {key} must be ints, ranges a-b or several joined '
                       f'by "|", got {text!r}.') from None
  return tuple(out)


def _number(item: str, key: str, text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ValueError(f'{item!r}: {key} must be a number, got {text!r}.') from None


def parse_interventions(spec: str) -> tuple[base.Intervention, ...]:
  """Interventions from 'name:key=value,...;name:...' (see the module docstring).

  Raises ValueError naming the item and the unknown name / key or the bad value.
  """
  if not isinstance(spec, str):
    raise TypeError(f'spec must be a str, got {type(spec).__name__}.')
  out = []
  for item in spec.split(';'):
    item = item.strip()
    if not item:
      continue
    name, _, params = item.partition(':')
    name = name.strip()
    if name not in PARSABLE:
      raise ValueError(f'unknown intervention {name!r} in {item!r}; known: '
                       f'{sorted(PARSABLE)}.')
    cls, keys = PARSABLE[name]
    kwargs: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in params.split(','))):
      key, eq, value = pair.partition('=')
      key, value = key.strip(), value.strip()
      if not eq or not value:
        raise ValueError(f'{item!r}: expected key=value, got {pair!r}.')
      if key in _SELECT:
        arg, parsed = key, _indices(item, key, value)
      elif key in keys:
        arg, parsed = keys[key], _number(item, key, value)
      else:
        raise ValueError(f'{item!r}: unknown key {key!r} for {name}; known: '
                         f'{sorted(keys) + list(_SELECT)}.')
      if arg in kwargs:
        raise ValueError(f'{item!r}: {key} given twice.')
      kwargs[arg] = parsed
    try:
      out.append(cls(**kwargs))
    except (TypeError, ValueError) as e:
      raise ValueError(f'{item!r}: {e}') from e
  return tuple(out)
