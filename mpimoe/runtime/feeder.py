"""Rank 0's side of continuous batching: hand requests to front-ends as they
have room, collect their results, commit the output chunk by chunk.

The input is cut into chunks of at most ``budget`` prompt tokens
(mpimoe.io.inputs.InputStream.batches, the same cut whatever the start, so a
rerun resumes at a chunk boundary).  Requests are handed out from the
current chunk only, first come first served, dealt round the front-ends up
to each one's room; once every result of the chunk is in it is written as one
chunk of the output (in input order) and the next chunk starts, on
front-ends that are then all empty.  So each chunk is scheduled from an
empty batch, and a resumed run schedules (and computes) every chunk exactly
as an uninterrupted one; the cost is the tail of each chunk, where fewer
sequences run.  Memory: one chunk's requests and results.
"""

from collections import deque

import numpy as np

from mpimoe.runtime.request import Request

__all__ = ['Feeder']


class Feeder:
    """stream: mpimoe.io.inputs.InputStream; writer: the OutputWriter (entered
    by the caller); budget: prompt tokens per chunk; progress:
    mpimoe.runtime.progress.Progress or None."""

    def __init__(self, stream, writer, budget, progress=None):
        self.writer, self.progress = writer, progress
        self._chunks = stream.batches(budget, start=writer.written)
        self.chunk = None           # (first index, Inputs) being generated
        self.queue = deque()        # its requests not handed out yet
        self.results = {}           # its results so far: index -> Result
        self._next_chunk()

    @property
    def done(self):
        """Every chunk committed."""
        return self.chunk is None

    def _next_chunk(self):
        self.chunk = next(self._chunks, None)
        self.results = {}
        if self.chunk is not None:
            first, batch = self.chunk
            self.queue.extend(Request(first + i, batch.ids[i], batch.seq(i), batch.params[i])
                              for i in range(len(batch)))

    def hand_out(self, rooms):
        """rooms: int per front-end -> a list of Requests per front-end, dealt
        one at a time round the front-ends that have room, so that a chunk
        smaller than their room is shared out, not given to front-end 0."""
        out = [[] for _ in rooms]
        left = list(rooms)
        while self.queue and any(left):
            for f, room in enumerate(left):
                if room and self.queue:
                    out[f].append(self.queue.popleft())
                    left[f] -= 1
        return out

    def collect(self, results):
        """Take results (mpimoe.runtime.request.Result); commit the chunk once
        all are in, then start the next."""
        for r in results:
            self.results[r.index] = r
        while self.chunk is not None and len(self.results) == len(self.chunk[1]):
            self._commit()
            self._next_chunk()

    def _commit(self):
        first, batch = self.chunk
        got = [self.results[first + i] for i in range(len(batch))]
        w = self.writer
        w.write(np.arange(first, first + len(batch)), batch.ids, [r.tokens for r in got],
                np.stack([r.last_logits for r in got]) if w.save_logits else None,
                finish_reasons=[r.finish_reason for r in got], prompt_tokens=batch.lengths,
                texts=[r.text for r in got] if w.text else None,
                openai=batch.openai if w.openai else None)
        if self.progress is not None:
            self.progress.update(len(batch), int(batch.lengths.sum()) +
                                 sum(len(r.tokens) for r in got))
