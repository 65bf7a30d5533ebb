"""What one input sequence asks for, and what it gets.

A :class:`Request` is a prompt with its :class:`SamplingParams` (the run's
defaults, overridden key by key by its input line); a :class:`Result` is
what generation made of it.  Both travel between ranks pickled, a few per step.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ['SamplingParams', 'Request', 'Result', 'FINISH_REASONS']

#: why a sequence ended: at an end-of-sequence or stop token (kept in the
#: output) or a stop string, or at its ``max_tokens``
FINISH_REASONS = ('stop', 'length')


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated (the input line's keys, see README).

    max_tokens: new tokens at most (0: prefill only); temperature: 0 is greedy
    (argmax), else softmax(logits / temperature) is sampled; top_k: sample
    among the k most likely tokens (0: all); top_p: then among the fewest most
    likely of those whose probabilities, renormalised over them, sum to at
    least top_p (1: all); top_k and top_p do not apply when greedy; seed:
    with the sequence's id and step, the whole random stream
    (mpimoe.runtime.sampler); stop_token_ids: tokens that end the sequence
    like an end-of-sequence token; ignore_eos: do not stop at the model's
    end-of-sequence token(s); stop: strings that end the sequence once its
    generated text (detokenized) contains one, the text returned ending
    before it (OpenAI semantics; needs a tokenizer).
    """
    max_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    stop: tuple = ()


@dataclass
class Request:
    """index: position in the input; id: its id; prompt: int64 [L]."""
    index: int
    id: str
    prompt: np.ndarray
    params: SamplingParams


@dataclass
class Result:
    """tokens: int32 [n] generated (an ending stop token included, and the
    token that completed a stop string); finish_reason: one of
    FINISH_REASONS; last_logits: float32 [V] at the last prompt position, or
    None when the run does not save them; text: the tokens detokenized, cut
    before a stop string (None without a tokenizer)."""
    index: int
    tokens: np.ndarray
    finish_reason: str
    last_logits: np.ndarray = None
    text: str = None
