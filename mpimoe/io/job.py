"""What a run opens before any compute: its tokenizer, its input stream and
its (maybe resumed) output writer."""

import json

from mpimoe.io.files import check_writable
from mpimoe.io.inputs import InputStream
from mpimoe.io.outputs import OutputWriter, output_format


def job_tokenizer(opts, wf):
    """The run's TextTokenizer (opts: JobOptions, wf: WeightFile): the one of
    ``--tokenizer``, else the weight file's, else None; one whose ids exceed
    the model's vocabulary is refused (DataError)."""
    from mpimoe.checkpoint.tokenizer_files import load_tokenizer
    if opts.tokenizer is not None:          # '' too: a path, refused as one
        return load_tokenizer(opts.tokenizer, wf.config.vocab_size)[1]
    return wf.tokenizer()


def open_job(opts, wf, meta, n_frontends=1, *, tokenizer=None, **options):
    """The input stream and the (maybe resumed) output writer of a run
    (opts: mpimoe.runtime.options.JobOptions) with the weights ``wf``
    (WeightFile) and ``tokenizer`` (:func:`job_tokenizer`) on
    ``n_frontends`` front-ends: (InputStream, OutputWriter).

    The stream is validated for the run's generation settings
    (``opts.sampling()``), its step budget and KV cache.  What must not
    change for a rerun to resume: the input's bytes (and so every line's own
    settings), the tokenizer's files, the weights (:meth:`WeightFile.identity`,
    its end-of-sequence ids included), the default settings (:func:`generation_identity`), the
    options that shape the steps (``opts.schedule``: batch composition, so
    that a resumed output is bit for bit an uninterrupted one) and
    ``options`` (str/int/float values that change results).  The writer
    holds the output's lock: enter it, or :meth:`~OutputWriter.close` it.
    """
    check_writable(opts.output, '--output', overwrite=True,
                   reads=[('--input', opts.input), ('--weights', wf.name)])
    output_format(opts.output, opts.save_logits)        # before the input's long check
    cfg = wf.config
    stream = InputStream(opts.input, cfg.vocab_size, context=cfg.max_position_embeddings,
                         batch_tokens=opts.max_batch_tokens, defaults=opts.sampling(),
                         kv_tokens=opts.kv_cache_tokens, tokenizer=tokenizer)
    identity = {'input_sha256': stream.sha256, 'weights_sha256': wf.identity(),
                'tokenizer_sha256': tokenizer.sha256 if tokenizer else '',
                **generation_identity(stream.defaults), **opts.schedule(n_frontends),
                **options}
    meta = {**meta, 'input_sha256': stream.sha256}
    if tokenizer:
        meta['tokenizer'] = tokenizer.source
    writer = OutputWriter(opts.output, len(stream), cfg.vocab_size, opts.save_logits, meta,
                          identity, overwrite=opts.overwrite, text=tokenizer is not None,
                          openai=stream.openai)
    return stream, writer


def generation_identity(defaults):
    """The run's default generation settings (SamplingParams) as identity or
    metadata values (str/int/float): {'max_new_tokens', 'temperature',
    'top_k', 'top_p', 'seed', 'stop_token_ids' ('2,7'; '' for none),
    'ignore_eos' (0 or 1), 'stop' (a JSON list)}."""
    return {'max_new_tokens': defaults.max_tokens, 'temperature': float(defaults.temperature),
            'top_k': defaults.top_k, 'top_p': float(defaults.top_p), 'seed': defaults.seed,
            'stop_token_ids': ','.join(map(str, defaults.stop_token_ids)),
            'ignore_eos': int(defaults.ignore_eos),
            'stop': json.dumps(list(defaults.stop), ensure_ascii=False)}
