"""Stop strings: a sequence ends once the text of its generated tokens
contains one of its stop strings; the text returned ends before it (OpenAI
semantics), the tokens keep the one that completed it.

    m = StopMatcher(tokenizer, ('\\n\\n', 'END'))
    for t in generated:
        if m.push(t):          # a stop string is complete
            break
    text = cut_text(tokenizer, tokens, stops)

Detection decodes incrementally: each step decodes only the tokens since
the last clean cut of the text (a few: a token that ends inside a UTF-8
character, or that decodes to nothing, waits for the next), and searches only
the window where a stop string could end.  A decoder may rewrite text it gave
for earlier tokens (byte fallback turning a byte group into U+FFFD), so a
stop seen in the stream is confirmed on the decode of all the tokens, the
text :func:`cut_text` cuts, before the sequence ends.
"""

__all__ = ['StopMatcher', 'cut_text']

#: tokens decoded together at most before their text is taken as it is (a
#: run of tokens that decode to nothing would otherwise grow each step's work)
_MAX_PENDING = 16


class StopMatcher:
    """Watches one sequence's generated tokens for ``stops`` (str, non-empty)."""

    def __init__(self, tokenizer, stops):
        self._tok = tokenizer
        self.stops = tuple(stops)
        self._longest = max(map(len, self.stops))
        # a text ending in U+FFFD may be mid-character: wait for the next token,
        # unless a stop string holds U+FFFD itself
        self._wait_fffd = not any('\ufffd' in x for x in self.stops)
        self._tokens = []
        # tokens[_prefix:_read] gave out text already; each step decodes from
        # _prefix (a boundary where text was cut cleanly) to the end
        self._prefix = self._read = 0
        self._before = ''       # the text of tokens[_prefix:_read]
        self._tail = ''         # the text's last (longest stop - 1) characters

    def push(self, token):
        """Add the next generated token; True once a stop string is in the text."""
        self._tokens.append(int(token))
        before, text = self._before, self._tok.decode(self._tokens[self._prefix:])
        if ((self._wait_fffd and text.endswith('\ufffd')) or len(text) <= len(before)) \
                and len(self._tokens) - self._read < _MAX_PENDING:
            return False        # wait: mid-character, or nothing new yet
        new = text[len(before):] if text.startswith(before) else text
        self._prefix, self._read = self._read, len(self._tokens)
        # decoded again, not cut from text: a decoder strips or joins at a window's start
        self._before = self._tok.decode(self._tokens[self._prefix:])
        window = self._tail + new
        self._tail = window[max(0, len(window) - self._longest + 1):] if self._longest > 1 \
            else ''
        if not any(x in window for x in self.stops):
            return False
        full = self._tok.decode(self._tokens)
        return any(x in full for x in self.stops)


def cut_text(tokenizer, tokens, stops=()):
    """The text of generated ``tokens``, ending before the earliest of
    ``stops`` in it (all of it when none occurs)."""
    text = tokenizer.decode(tokens)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(found)] if found else text
