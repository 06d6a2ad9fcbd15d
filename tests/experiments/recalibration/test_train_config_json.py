"""train_and_evaluate writes <workdir>/config.json: the workdir is self-describing."""

import json
import os

from experiments import train_lib
from experiments.recalibration import checkpoints
from tests.experiments.recalibration import conftest


def test_config_json_is_the_config(trained_workdir):
  path = os.path.join(trained_workdir, train_lib.CONFIG_FILE)
  with open(path, encoding='utf-8') as f:
    values = json.load(f)
  config = conftest.tiny_config()
  assert values == json.loads(config.to_json())
  assert values['train']['num_steps'] == 6 and values['preset'] == 'tiny'
  # It round-trips into a trainer config (what experiments.recalibrate reads).
  rebuilt = checkpoints.trainer_config(values)
  assert rebuilt.to_dict() == config.to_dict()
  assert not os.path.exists(path + '.tmp')
