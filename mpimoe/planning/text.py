"""Phrases for plan summaries and messages: counts, ranges, sizes, changes.

    >>> plural(3, 'expert'), labelled('rank', 0, 191), size_text(62.66e9)
    ('3 experts', 'ranks 0-191', '62.66 GB')
"""

__all__ = ['GB', 'MB', 'plural', 'span', 'labelled', 'or_list', 'size_text', 'change',
           'rank_list']

GB = 1e9
MB = 1e6


def plural(n, noun):
    """'1 expert', '3 experts'."""
    return f'{n} {noun}' + ('' if n == 1 else 's')


def span(a, b):
    """'3' or '3-5'."""
    return str(a) if a == b else f'{a}-{b}'


def labelled(noun, a, b):
    """'rank 0' or 'ranks 0-191'."""
    return f'{noun} {a}' if a == b else f'{noun}s {a}-{b}'


def or_list(xs):
    """'4', '4 or 8', '4, 8 or 16'."""
    return str(xs[0]) if len(xs) == 1 else ', '.join(map(str, xs[:-1])) + f' or {xs[-1]}'


def size_text(nbytes):
    """'62.66 GB', or '0.06 GB (58.72 MB)' below one GB."""
    gb = f'{nbytes / GB:.2f} GB'
    return gb if nbytes >= GB else f'{gb} ({nbytes / MB:.2f} MB)'


def change(before, after):
    """'-28.1%' (relative change; '+0.0%' when before is 0)."""
    return f'{100 * (after / before - 1) if before else 0.0:+.1f}%'


def rank_list(ranks):
    """'[0, 1, ...]' of at most 16 of ``ranks`` (a list), for error messages."""
    return str(ranks[:16])[:-1] + (', ...]' if len(ranks) > 16 else ']')
