"""What a run opens before any compute: its input stream and its (maybe
resumed) output writer."""

from mpimoe.io.files import check_writable
from mpimoe.io.inputs import InputStream
from mpimoe.io.outputs import OutputWriter




def open_job(input_path, output, wf, save_logits, meta, overwrite, *, max_new_tokens,
             batch_tokens, **options):
    """The input stream (validated for ``max_new_tokens`` new tokens in
    batches of ``batch_tokens``) and the (maybe resumed) output writer of a run
    over ``input_path`` with the weights ``wf`` (WeightFile): (InputStream, OutputWriter).

    What must not change for a rerun to resume: the input's bytes, the weights
    (:meth:`WeightFile.identity`) and the ``options`` that change results
    (str/int/float values; batch composition included, so that a resumed
    output is bit for bit an uninterrupted one).  The writer holds the
    output's lock: enter it, or :meth:`~OutputWriter.close` it.
    """
    check_writable(output, '--output', overwrite=True,
                   reads=[('--input', input_path), ('--weights', wf.name)])
    cfg = wf.config
    stream = InputStream(input_path, cfg.vocab_size, max_new_tokens,
                         cfg.max_position_embeddings, batch_tokens)
    identity = {'input_sha256': stream.sha256, 'weights_sha256': wf.identity(),
                'max_new_tokens': max_new_tokens, 'batch_tokens': batch_tokens, **options}
    writer = OutputWriter(output, len(stream), cfg.vocab_size, save_logits, meta,
                          identity, overwrite=overwrite)
    return stream, writer
