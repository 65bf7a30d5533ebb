"""What a run opens before any compute: its input stream and its (maybe
resumed) output writer."""

from mpimoe.io.files import check_writable
from mpimoe.io.inputs import InputStream
from mpimoe.io.outputs import OutputWriter


def open_job(input_path, output, wf, save_logits, meta, overwrite, *, batch_tokens,
             max_new_tokens=None, defaults=None, **options):
    """The input stream (validated for the run's generation settings
    ``defaults``, a SamplingParams, default ``SamplingParams(max_tokens=
    max_new_tokens)``, in batches of ``batch_tokens``) and the (maybe resumed)
    output writer of a run over ``input_path`` with the weights ``wf``
    (WeightFile): (InputStream, OutputWriter).

    What must not change for a rerun to resume: the input's bytes (and so
    every line's own settings), the weights (:meth:`WeightFile.identity`,
    its end-of-sequence ids included), the default settings
    (:func:`generation_identity`), ``batch_tokens`` and the ``options`` that
    change results (str/int/float values; batch composition included, so that
    a resumed output is bit for bit an uninterrupted one).  The writer holds
    the output's lock: enter it, or :meth:`~OutputWriter.close` it.
    """
    check_writable(output, '--output', overwrite=True,
                   reads=[('--input', input_path), ('--weights', wf.name)])
    cfg = wf.config
    stream = InputStream(input_path, cfg.vocab_size, max_new_tokens,
                         cfg.max_position_embeddings, batch_tokens, defaults=defaults)
    identity = {'input_sha256': stream.sha256, 'weights_sha256': wf.identity(),
                **generation_identity(stream.defaults), 'batch_tokens': batch_tokens,
                **options}
    writer = OutputWriter(output, len(stream), cfg.vocab_size, save_logits, meta,
                          identity, overwrite=overwrite)
    return stream, writer


def generation_identity(defaults):
    """The run's default generation settings (SamplingParams) as identity or
    metadata values (str/int/float): {'max_new_tokens', 'temperature',
    'top_k', 'top_p', 'seed', 'stop_token_ids' ('2,7'; '' for none),
    'ignore_eos' (0 or 1)}."""
    return {'max_new_tokens': defaults.max_tokens, 'temperature': float(defaults.temperature),
            'top_k': defaults.top_k, 'top_p': float(defaults.top_p), 'seed': defaults.seed,
            'stop_token_ids': ','.join(map(str, defaults.stop_token_ids)),
            'ignore_eos': int(defaults.ignore_eos)}
