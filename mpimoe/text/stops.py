"""Stop strings: a sequence ends once the text of its generated tokens
contains one of its stop strings; the text returned ends before it (OpenAI
semantics), the tokens keep the one that completed it.

    m = StopMatcher(tokenizer, ('\\n\\n', 'END'))
    for t in generated:
        if m.push(t):          # a stop string is complete
            break
    text = cut_text(tokenizer, tokens, stops)

Detection decodes incrementally (``tokenizers``' DecodeStream: each token's
text once), so a step costs each sequence a few microseconds whatever its
length; only the window where a stop string could end is searched (a
step's new text and the characters before it that a stop could span).
"""

from tokenizers.decoders import DecodeStream

__all__ = ['StopMatcher', 'cut_text']


class StopMatcher:
    """Watches one sequence's generated tokens for ``stops`` (str, non-empty)."""

    def __init__(self, tokenizer, stops):
        self._tok = tokenizer.backend
        self._stream = DecodeStream(skip_special_tokens=True)
        self.stops = tuple(stops)
        self._longest = max(map(len, self.stops))
        self._tail = ''        # the text's last (longest stop - 1) characters

    def push(self, token):
        """Add the next generated token; True once a stop string is in the text."""
        new = self._stream.step(self._tok, int(token))
        if not new:
            return False
        window = self._tail + new
        self._tail = window[max(0, len(window) - self._longest + 1):] if self._longest > 1 else ''
        return any(s in window for s in self.stops)


def cut_text(tokenizer, tokens, stops=()):
    """The text of generated ``tokens``, ending before the earliest of
    ``stops`` in it (all of it when none occurs)."""
    text = tokenizer.decode(tokens)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(found)] if found else text
