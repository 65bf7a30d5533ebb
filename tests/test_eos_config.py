"""The model's end-of-sequence ids (``ModelConfig.eos_token_id``): set with
``--set``, stored in the weight file, bounded, and () for files written
before the field existed."""

import json
import shutil

import h5py
import pytest

from mpimoe.checkpoint.weights import WeightFile
from mpimoe.cli.main import main
from mpimoe.errors import ConfigError
from mpimoe.model.config import MAX_EOS_IDS, PRESETS, ModelConfig, model_config


@pytest.mark.parametrize('value, expected', [('3', (3,)), ('2,7', (2, 7)), (' 2 , 7 ', (2, 7)),
                                             ('', ())])
def test_set_end_of_sequence_ids(value, expected):
    cfg = model_config('tiny', [f'eos_token_id={value}'])
    assert cfg.eos_token_id == expected
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_presets_have_none():
    assert all(model_config(name).eos_token_id == () for name in PRESETS)


@pytest.mark.parametrize('value, message', [
    ('256', 'eos_token_id=[256]: 256 is not a token id in [0, vocab_size=256)'),
    ('2,-1', 'eos_token_id=[2, -1]: -1 is not a token id in [0, vocab_size=256)'),
    ('2;7', '--set eos_token_id=2;7: not a valid list of ints (comma-separated: 2,7)'),
    (','.join(['1'] * (MAX_EOS_IDS + 1)), f'eos_token_id: 65 ids; at most {MAX_EOS_IDS}'),
])
def test_bad_end_of_sequence_ids_are_one_line_naming_the_field(value, message):
    with pytest.raises(ConfigError) as e:
        model_config('tiny', [f'eos_token_id={value}'])
    assert str(e.value) == message


def test_init_weights_stores_them(tmp_path, capsys):
    out = tmp_path / 'w.h5'
    assert main(['init-weights', '--preset', 'tiny', '--set', 'eos_token_id=3',
                 '--out', str(out)]) == 0
    with WeightFile(out) as wf:
        assert wf.config.eos_token_id == (3,)
    assert main(['init-weights', '--preset', 'tiny', '--set', 'eos_token_id=999',
                 '--out', str(tmp_path / 'bad.h5')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'eos_token_id=[999]: 999 is not a token id' in err, err


def test_files_written_before_the_field_read_as_none(tiny_weights, tmp_path):
    old = tmp_path / 'old.h5'
    shutil.copy(tiny_weights, old)
    with h5py.File(old, 'r+') as f:
        config = json.loads(f.attrs['config'])
        del config['eos_token_id']
        f.attrs['config'] = json.dumps(config)
    with WeightFile(old) as wf:
        assert wf.config.eos_token_id == ()
