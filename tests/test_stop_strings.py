"""Stop strings through the scheduler (mpimoe.runtime.scheduler) on the
reference model: a sequence with a stop string generates exactly the tokens
of the same sequence without it up to the first token whose text completes
the string (greedy decoding is a function of the tokens so far), ends there
with finish reason `stop`, and its text is the decode of its tokens cut
before the string."""

import numpy as np
import pytest

from bpe import write_bpe
from mpimoe.checkpoint.weights import WeightFile
from mpimoe.model.reference import load_reference
from mpimoe.text.tokenizer import TextTokenizer, read_tokenizer_files

N = 24


@pytest.fixture(scope='module')
def model(tiny_weights):
    with WeightFile(tiny_weights) as wf:
        return load_reference(wf)


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
    folder = write_bpe(tmp_path_factory.mktemp('bpe'))
    return TextTokenizer(read_tokenizer_files(folder), str(folder))


def test_a_stop_string_ends_the_sequence_where_its_text_completes_it(model, tok):
    prompts = [tok.encode_prompt(t) for t in ('Hello world', 'The quick brown fox', 'STOP')]
    free = model.results(prompts, N, tokenizer=tok, ignore_eos=True)
    for r in free:
        assert r.finish_reason == 'length' and r.text == tok.decode(r.tokens)
    # a stop string: the text of generated tokens 3..5 of the first sequence
    stop = tok.decode(free[0].tokens[3:6]).strip()[:3] or tok.decode(free[0].tokens[3:6])
    assert stop, 'the random model generated no visible text'
    cut = model.results(prompts, N, tokenizer=tok, ignore_eos=True, stop=(stop,))
    for before, after in zip(free, cut):
        k = next((k for k in range(1, N + 1) if stop in tok.decode(before.tokens[:k])), None)
        if k is None:               # never in this sequence's text: unchanged
            assert after.finish_reason == 'length'
            np.testing.assert_array_equal(after.tokens, before.tokens)
            continue
        np.testing.assert_array_equal(after.tokens, before.tokens[:k])
        assert after.finish_reason == 'stop'
        full = tok.decode(after.tokens)
        assert after.text == full[:full.index(stop)] and stop not in after.text
    assert cut[0].finish_reason == 'stop'


def test_without_a_tokenizer_results_have_no_text(model):
    r, = model.results([[1, 2, 3]], 4)
    assert r.text is None and r.tokens.size <= 4
