"""Continuous batching on one front-end: which sequences each step runs,
and when a sequence stops.

Requests wait in arrival order.  Each step runs one token of every running
sequence (decode) and, while the step's token budget (``max_batch_tokens``),
the number of running sequences (``max_seqs``) and the KV cache allow, the
whole prompt of the next waiting ones (prefill, packed into the same step).
A sequence joining reserves KV blocks for its prompt plus its ``max_tokens``
(mpimoe.model.kvcache), so a running sequence never waits for memory; the
first waiting request that does not fit waits for the next step (first come,
first served, no overtaking).  After the step the sampler
(mpimoe.runtime.sampler) picks each sequence's next token; a sequence ends
at the first end-of-sequence token (unless ``ignore_eos``) or stop token,
both kept in its output, or once its text contains a stop string
(mpimoe.text.stops; finish reason ``stop`` for all three), or at
``max_tokens`` (``length``), and leaves at once, giving back its blocks.
With a tokenizer, its Result carries its text (cut before a stop string).

Everything here is a function of the requests and the sampled tokens only,
so a front-end started on the same requests schedules the same steps.
"""

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mpimoe.runtime.request import Result
from mpimoe.runtime.sampler import sample
from mpimoe.text.stops import StopMatcher, cut_text

__all__ = ['Scheduler', 'Step', 'job_scheduler']


@dataclass(eq=False)             # compared by identity: one object per sequence
class _Running:
    req: object                 # mpimoe.runtime.request.Request
    handle: int                 # its sequence in the KV cache
    stops: frozenset            # token ids that end it
    matcher: object             # its StopMatcher (stop strings), or None
    tokens: list = field(default_factory=list)
    last_logits: object = None


@dataclass
class Step:
    """One step's batch: ``seqs`` [B] (KV cache handles) with ``ntok`` [B] new
    tokens each, ``tokens`` [T] packed in that order; decodes first, then the
    prefills of the sequences that joined (the last B - n_decode); ``running``
    [B] their states."""
    tokens: np.ndarray
    seqs: np.ndarray
    ntok: np.ndarray
    running: list
    n_decode: int

    @property
    def prefill_tokens(self):
        return len(self.tokens) - self.n_decode

    def __len__(self):
        return len(self.seqs)


class Scheduler:
    """cache: mpimoe.model.kvcache.BlockKVCache of this front-end; eos: the
    model's end-of-sequence token ids; save_logits: keep each sequence's
    logits at its last prompt position for its Result; static: admit new
    sequences only when none runs (the baseline continuous batching beats);
    tokenizer: mpimoe.text.tokenizer.TextTokenizer (text and stop strings),
    or None (then no request may have stop strings)."""

    def __init__(self, cache, max_batch_tokens, max_seqs, eos=(), save_logits=False,
                 static=False, tokenizer=None):
        self.cache, self.tokenizer = cache, tokenizer
        # a step decodes one token of each running sequence: at most the budget
        self.max_batch_tokens, self.max_seqs = max_batch_tokens, min(max_seqs, max_batch_tokens)
        self.eos = frozenset(eos)
        self.save_logits, self.static = save_logits, static
        self.waiting = deque()
        self.running = []           # in the order they joined

    def add(self, requests):
        """Queue mpimoe.runtime.request.Request objects, in order."""
        self.waiting.extend(requests)

    def room(self):
        """How many more requests this front-end should be given now: enough
        to fill its ``max_seqs`` running sequences, no more."""
        return max(0, self.max_seqs - len(self.running) - len(self.waiting))

    @property
    def idle(self):
        return not self.waiting and not self.running

    def schedule(self):
        """The next step's batch (empty when nothing runs or fits)."""
        budget = self.max_batch_tokens - len(self.running)
        joined = []
        while self.waiting and len(self.running) + len(joined) < self.max_seqs and \
                not (self.static and self.running):
            req = self.waiting[0]
            n = len(req.prompt)
            if n > budget:
                break
            handle = self.cache.allocate(n + req.params.max_tokens)
            if handle is None:
                break
            self.waiting.popleft()
            p = req.params
            stops = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos)
            matcher = StopMatcher(self.tokenizer, p.stop) if p.stop else None
            joined.append(_Running(req, handle, stops, matcher))
            budget -= n
        decode = list(self.running)
        self.running.extend(joined)
        batch = decode + joined
        # the decodes' last tokens, then the joining prompts
        tokens = np.concatenate([np.array([r.tokens[-1] for r in decode], np.int64)] +
                                [np.asarray(r.req.prompt, np.int64) for r in joined])
        ntok = np.array([1] * len(decode) + [len(r.req.prompt) for r in joined], np.int64)
        return Step(tokens, np.array([r.handle for r in batch], dtype=np.int64), ntok, batch,
                    len(decode))

    def finish(self, step, logits):
        """Sample each sequence's next token from logits [B, V] (host) of
        ``step``; returns the Results of the sequences that ended."""
        done = []
        live = [j for j, r in enumerate(step.running) if r.req.params.max_tokens > 0]
        if self.save_logits:
            for j, r in enumerate(step.running):
                if not r.tokens:
                    r.last_logits = logits[j].copy()
        if live:
            chosen = sample(logits[live], [step.running[j].req.params for j in live],
                            [step.running[j].req.id for j in live],
                            np.array([len(step.running[j].tokens) for j in live]))
            for j, t in zip(live, chosen.tolist()):
                r = step.running[j]
                r.tokens.append(t)
                if t in r.stops or (r.matcher is not None and r.matcher.push(t)):
                    done.append((r, 'stop'))
                elif len(r.tokens) >= r.req.params.max_tokens:
                    done.append((r, 'length'))
        done += [(step.running[j], 'length') for j in range(len(step))
                 if step.running[j].req.params.max_tokens == 0]
        for r, _ in done:
            self.cache.release(r.handle)
            self.running.remove(r)
        tok = self.tokenizer
        return [Result(r.req.index, np.array(r.tokens, np.int32), why, r.last_logits,
                       None if tok is None else cut_text(tok, r.tokens, r.req.params.stop))
                for r, why in done]


def job_scheduler(front, opts, tokenizer=None):
    """The Scheduler, over a new KV cache, of one front-end (front:
    mpimoe.model.frontend.FrontEnd) for a job's options (JobOptions) and
    tokenizer (TextTokenizer or None)."""
    cache = front.new_cache(opts.kv_cache_tokens, opts.max_seqs)
    return Scheduler(cache, opts.max_batch_tokens, opts.max_seqs, front.cfg.eos_token_id,
                     opts.save_logits, static=opts.batching == 'static', tokenizer=tokenizer)
