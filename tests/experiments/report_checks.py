"""An independent reader of the benchmark's results.md: tables and links.

Written from the markdown table rules (GitHub flavour), not from the writer: a row is
a line starting with '|', cells are separated by '|' not preceded by a backslash, the
second line of a table is its separator (cells of '-', optionally ':').
"""

import os
import re

_SEPARATOR_CELL = re.compile(r'^:?-{3,}:?$')
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')


def cells(line: str) -> list[str]:
  """The cells of one table line (outer pipes dropped, escaped pipes kept)."""
  body = line.strip()
  assert body.startswith('|') and body.endswith('|'), line
  parts, cur, i = [], '', 1
  while i < len(body) - 1:
    ch = body[i]
    if ch == '\\' and body[i + 1] == '|':
      cur += '|'
      i += 2
      continue
    if ch == '|':
      parts.append(cur.strip())
      cur = ''
    else:
      cur += ch
    i += 1
  parts.append(cur.strip())
  return parts


def tables(text: str) -> list[list[str]]:
  """Blocks of consecutive lines that start with '|'."""
  out, cur = [], []
  for line in text.splitlines():
    if line.lstrip().startswith('|'):
      cur.append(line)
    elif cur:
      out.append(cur)
      cur = []
  if cur:
    out.append(cur)
  return out


def check_rectangular(text: str) -> int:
  """Asserts every table has a header, a separator and rows of equal width."""
  found = tables(text)
  for block in found:
    assert len(block) >= 3, f'a table without rows: {block}'
    header = cells(block[0])
    assert all(header), f'an empty header cell: {block[0]}'
    separator = cells(block[1])
    assert all(_SEPARATOR_CELL.match(c) for c in separator), block[1]
    for line in block[1:]:
      assert len(cells(line)) == len(header), (
          f'{len(cells(line))} cells under a {len(header)}-cell header:\n'
          f'{block[0]}\n{line}')
  return len(found)


def check_report(workdir: str, topics: list[str]) -> dict[str, list[str]]:
  """Checks <workdir>/results.md: a section per topic, rectangular tables, every
  linked file present. Returns {topic: its linked files}."""
  text = open(os.path.join(workdir, 'results.md')).read()
  assert check_rectangular(text) >= len(topics)
  sections = re.split(r'^## ', text, flags=re.M)[1:]
  names = [s.split()[0] for s in sections]
  assert names == topics, names
  links = {}
  for name, body in zip(names, sections):
    links[name] = _LINK.findall(body)
    for target in links[name]:
      assert os.path.isfile(os.path.join(workdir, target)), target
  return links
