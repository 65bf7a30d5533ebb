"""The single-process reference model: the oracle the engine is checked against.

NumPy, FP32 arithmetic on weights read from the BF16 file; activations
entering an expert are rounded to 16 bits exactly as they are on the wire in
the distributed engine (mpimoe.moe.experts.expert_ffn states the contract).
"""

import numpy as np

from mpimoe import __version__
from mpimoe.model.generate import generate
from mpimoe.model.frontend import FrontEnd
from mpimoe.moe.experts import moe_local

__all__ = ['ReferenceModel', 'load_reference', 'run_reference']


class ReferenceModel:
    """The whole model in one process.

    tensors: dict of the non-expert tensors (float32); experts: dict
    moe layer index -> list of E weight dicts (float32).
    """

    def __init__(self, cfg, tensors, experts):
        self.cfg = cfg
        self.front = FrontEnd(cfg, tensors)
        self.experts = experts

    def forward(self, tokens, cache, seqs, ntok):
        """tokens: int [T]; seqs, ntok: int [B] -> logits float32 [B, vocab]
        at each sequence's last new token."""
        fe, cfg = self.front, self.cfg
        x = fe.embed(tokens)
        for i in range(cfg.n_layers):
            x = fe.attention_block(i, x, cache, seqs, ntok)
            h = fe.ffn_input(i, x)
            if i < cfg.n_dense_layers:
                x = x + fe.dense_ffn(i, h)
            else:
                x = x + moe_local(h, fe.router[i], self.experts[i], cfg)[0]
        cache.advance(seqs, ntok)
        return fe.logits(x[np.cumsum(ntok) - 1])

    def generate(self, prompts, max_new_tokens):
        """prompts: list of int arrays -> (generated int32 [B, N], last_logits [B, V])."""
        return generate(self.forward, self.front.new_cache, prompts, max_new_tokens)


def load_reference(wf):
    """Read a whole :class:`~mpimoe.checkpoint.weights.WeightFile` into a ReferenceModel."""
    cfg = wf.config
    tensors = {k: v.astype(np.float32) for k, v in wf.read_nonexpert().items()}
    experts = {i: [{m: a.astype(np.float32) for m, a in wf.read_expert(i, e).items()}
                   for e in range(cfg.n_experts)] for i in cfg.moe_layers}
    return ReferenceModel(cfg, tensors, experts)


def run_reference(weights, input_path, output, max_new_tokens=0, save_logits=False,
                  overwrite=False, batch_tokens=4096, log=print):
    """``mpimoe reference``: the reference over a token file, output as in README.

    Inputs are streamed a batch at a time; every batch is a committed chunk of
    the output, so a killed run resumes.  SIGTERM/SIGUSR1 (exit 75) or SIGINT
    (130) stop it at the next step (forward pass): the batch in flight is
    abandoned, the committed ones stay.
    """
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.errors import UsageError
    from mpimoe.io.job import open_job
    from mpimoe.runtime.progress import Progress
    from mpimoe.runtime.signals import StopRequest, stop_error
    if max_new_tokens < 0:
        raise UsageError(f'--max-new-tokens {max_new_tokens}: must be >= 0')
    meta = {'producer': 'mpimoe reference', 'mpimoe_version': __version__,
            'weights': str(weights), 'input': str(input_path),
            'max_new_tokens': max_new_tokens}
    # check the weights' header, the inputs and the output path before the long part
    with WeightFile(weights) as wf:
        stream, writer = open_job(input_path, output, wf, save_logits, meta, overwrite,
                                  max_new_tokens=max_new_tokens, batch_tokens=batch_tokens)
        try:
            model = load_reference(wf)
        except BaseException:
            writer.close()              # the output's lock
            raise
    if writer.written:
        log(f'reference: resuming {output} after {writer.written} committed sequences')
    progress = Progress(len(stream), writer.written)
    with StopRequest() as stop, writer as out:
        def forward(*args):
            # a step boundary: a stop abandons the batch in flight
            if stop:
                raise stop_error(stop.signum, f'{out.written} of {len(stream)} sequences '
                                 f'committed to {out.dir}; rerun the same command to resume')
            return model.forward(*args)

        for first, batch in stream.batches(batch_tokens, start=writer.written):
            prompts = [batch.seq(i) for i in range(len(batch))]
            gen, logits = generate(forward, model.front.new_cache, prompts, max_new_tokens)
            out.write(np.arange(first, first + len(batch)), batch.ids, list(gen),
                      logits if save_logits else None)
            progress.update(len(batch), int(batch.lengths.sum()) + gen.size)
    log(f'reference: {progress.line()} -> {output}')
