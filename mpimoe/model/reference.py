"""The single-process reference model: the oracle the engine is checked against.

NumPy, FP32 arithmetic on weights read from the BF16 file; activations
entering an expert are rounded to 16 bits exactly as they are on the wire in
the distributed engine (mpimoe.model.layers.expert_ffn states the contract).
The layer loop (mpimoe.model.forward), the MoE layer (mpimoe.moe.layer), the
scheduler and the sampler are the engine's own; only the dispatcher differs
(mpimoe.moe.local: every expert here).
"""

import numpy as np

from mpimoe import __version__
from mpimoe.backends.backend import Backend
from mpimoe.model.forward import forward
from mpimoe.model.frontend import FrontEnd
from mpimoe.moe.local import LocalDispatcher

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
        dispatcher = LocalDispatcher(cfg, experts)
        self.moe = self.front.moe_layers(dispatcher)

    def forward(self, tokens, cache, seqs, ntok):
        """tokens: int [T]; seqs, ntok: int [B] -> logits float32 [B, vocab]
        at each sequence's last new token (advances the cache)."""
        return forward(self.front, self.moe, tokens, cache, seqs, ntok)

    def generate(self, prompts, max_new_tokens, **params):
        """Greedy (or ``params``: SamplingParams fields) generation for a list
        of int prompts -> (list of int32 token arrays, last_logits float32
        [B, V]), continuously batched as ``mpimoe reference`` does."""
        got = self.results(prompts, max_new_tokens, **params)
        return [r.tokens for r in got], np.stack([r.last_logits for r in got])

    def results(self, prompts, max_new_tokens, tokenizer=None, **params):
        """As :meth:`generate`, -> the Results (mpimoe.runtime.request) in
        prompt order; ``tokenizer`` (TextTokenizer) gives them text and
        stop strings (``stop=``)."""
        from mpimoe.model.kvcache import BLOCK_TOKENS, blocks_for
        from mpimoe.runtime.request import Request, SamplingParams
        from mpimoe.runtime.scheduler import Scheduler
        p = SamplingParams(max_tokens=max_new_tokens, **params)
        # room for every sequence at once: all prompts in the first step
        tokens = sum(map(len, prompts))
        need = blocks_for(np.array([len(q) + max_new_tokens for q in prompts]))
        cache = self.front.new_cache(BLOCK_TOKENS * int(need.sum()), len(prompts))
        sched = Scheduler(cache, max(tokens, len(prompts)), len(prompts),
                          self.cfg.eos_token_id, save_logits=True, tokenizer=tokenizer)
        sched.add(Request(i, str(i), np.asarray(q, np.int64), p) for i, q in enumerate(prompts))
        results = {}
        with np.errstate(over='ignore', invalid='ignore'):
            while not sched.idle:
                step = sched.schedule()
                for r in sched.finish(step, self.forward(step.tokens, cache, step.seqs,
                                                         step.ntok)):
                    results[r.index] = r
        return [results[i] for i in range(len(prompts))]


def load_reference(wf, weights=None):
    """Read a whole :class:`~mpimoe.checkpoint.weights.WeightFile` into a ReferenceModel.

    weights: dict name -> 16-bit host array -> dict name -> array as the
    math takes them (mpimoe.backends.backend.Backend.weights); default:
    NumPy's FP32 copies (the reference); ``dict``: the 16-bit arrays
    themselves, with which NumPy computes the GPU's contract
    (mpimoe.model.layers).
    """
    cfg = wf.config
    weights = weights or Backend('numpy').weights
    experts = {i: [weights(wf.read_expert(i, e)) for e in range(cfg.n_experts)]
               for i in cfg.moe_layers}
    return ReferenceModel(cfg, weights(wf.read_nonexpert()), experts)


def run_reference(opts, log=print):
    """``mpimoe reference`` (opts: mpimoe.runtime.options.JobOptions): the
    reference over a token file, output as in README, scheduled as one
    front-end of the engine is.

    Inputs are streamed a chunk at a time; every chunk is committed to the
    output, so a killed run resumes.  SIGTERM/SIGUSR1 (exit 75) or SIGINT
    (130) stop it at the next step (forward pass): the chunk in flight is
    abandoned, the committed ones stay.
    """
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.io.job import job_tokenizer, open_job
    from mpimoe.runtime.feeder import Feeder
    from mpimoe.runtime.progress import Progress
    from mpimoe.runtime.scheduler import job_scheduler
    from mpimoe.runtime.signals import StopRequest, stop_error
    opts.validate()
    meta = {'producer': 'mpimoe reference', 'mpimoe_version': __version__,
            'weights': str(opts.weights), 'input': str(opts.input),
            'max_new_tokens': opts.max_new_tokens}
    # check the weights' header, the inputs and the output path before the long part
    with WeightFile(opts.weights) as wf:
        tokenizer = job_tokenizer(opts, wf)
        stream, writer = open_job(opts, wf, meta, 1, tokenizer=tokenizer)
        try:
            model = load_reference(wf)
        except BaseException:
            writer.close()              # the output's lock
            raise
    if writer.written:
        log(f'reference: resuming {opts.output} after {writer.written} committed sequences')
    progress = Progress(len(stream), writer.written)
    sched = job_scheduler(model.front, opts, tokenizer)
    # an overflow ends in NaN/Inf logits, which the front-end refuses in one
    # message (FrontEnd.logits); NumPy's warnings would only add lines
    with StopRequest() as stop, writer as out, np.errstate(over='ignore', invalid='ignore'):
        feeder = Feeder(stream, out, opts.chunk_budget(), progress)
        while not feeder.done:
            sched.add(feeder.hand_out([sched.room()])[0])
            if stop:            # a step boundary: the chunk in flight is abandoned
                raise stop_error(stop.signum, f'{out.written} of {len(stream)} sequences '
                                 f'committed to {out.dir}; rerun the same command to resume')
            step = sched.schedule()
            logits = model.forward(step.tokens, sched.cache, step.seqs, step.ntok)
            feeder.collect(sched.finish(step, logits))
    log(f'reference: {progress.line()} -> {opts.output}')
