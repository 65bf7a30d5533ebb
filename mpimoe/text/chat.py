"""Chat templates: a checkpoint's Jinja2 template rendered as transformers'
``apply_chat_template`` renders it, in Jinja2's immutable sandbox (a template
from a checkpoint is untrusted code).

    template = ChatTemplate(source_text)
    text = template.render(messages, {'bos_token': '<s>', 'eos_token': '</s>'})
"""

import contextlib
import json
import signal
import threading
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

__all__ = ['ChatTemplate', 'check_messages', 'text_messages', 'RENDER_SECONDS', 'MAX_RENDER_CHARS']

#: longest a template may take to render one chat (they take well under a
#: millisecond): a template that loops or grows without end is stopped
RENDER_SECONDS = 2.0
#: longest rendered chat, in characters
MAX_RENDER_CHARS = 16 << 20


class _Expired(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    """Raise _Expired in the block after ``seconds`` of wall time (SIGALRM;
    only in the main thread, where rank 0 and the reference read inputs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Expired
    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _raise(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # as transformers: no HTML escaping, non-ASCII kept
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters['tojson'] = _tojson
    env.globals['raise_exception'] = _raise
    env.globals['strftime_now'] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template; TemplateSyntaxError -> ValueError(problem)."""

    def __init__(self, source):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f'chat template does not compile: {e.message} (template line '
                             f'{e.lineno})') from None

    def render(self, messages, special_tokens):
        """The prompt text of ``messages`` (checked by :func:`check_messages`)
        with the assistant's generation prompt added; special_tokens: the
        tokenizer config's bos_token, eos_token, ... (str), as the template
        sees them.  Any failure of the template (its raise_exception, an
        undefined operation, a sandbox violation, a range too big, endless
        recursion, more than RENDER_SECONDS or MAX_RENDER_CHARS) ->
        ValueError(problem): a checkpoint's template is data, not our code."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            with _time_limit(RENDER_SECONDS):
                text = self._template.render(messages=messages, add_generation_prompt=True,
                                             tools=None, documents=None, **special_tokens)
        except _Expired:
            raise ValueError(f'chat template failed: still rendering one chat after '
                             f'{RENDER_SECONDS:g} s (a template that loops or grows without '
                             'end?)') from None
        except jinja2.TemplateError as e:
            raise ValueError(f'chat template failed: {e}') from None
        except Exception as e:      # untrusted template code: any failure is the checkpoint's
            raise ValueError(f'chat template failed: {type(e).__name__}: {e}') from None
        if len(text) > MAX_RENDER_CHARS:
            raise ValueError(f'chat template failed: it rendered {len(text):,} characters for '
                             f'one chat, more than {MAX_RENDER_CHARS:,}')
        return text


def text_messages(messages):
    """``messages`` checked, each content a string (or null): ValueError(problem)
    unless it is a non-empty list of objects each with a string "role" and a
    "content" that is a string, null, or a list of text parts ({"type":
    "text", "text": str}), which are joined with newlines (a text model sees
    text; other parts, such as images, are refused)."""
    check_messages(messages)
    out = []
    for j, m in enumerate(messages):
        content = m.get('content')
        if isinstance(content, list):
            bad = [p.get('type') for p in content if p.get('type') != 'text' or
                   not isinstance(p.get('text'), str)]
            if bad:
                raise ValueError(f'messages[{j}].content has a part of type {bad[0]!r}; this '
                                 'model reads text parts ({"type": "text", "text": ...}) only')
            m = {**m, 'content': '\n'.join(p['text'] for p in content)}
        out.append(m)
    return out


def check_messages(messages):
    """ValueError(problem) unless ``messages`` is a non-empty list of objects
    each with a string "role" and a "content" that is a string, null, or a
    list of parts (objects with a string "type")."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f'messages[{j}] is not an object')
        if not isinstance(m.get('role'), str):
            raise ValueError(f'messages[{j}] has no string "role"')
        content = m.get('content')
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and isinstance(p.get('type'), str) for p in content)
        if not (content is None or isinstance(content, str) or parts_ok):
            raise ValueError(f'messages[{j}].content must be a string, null or a list of '
                             '{"type": ...} parts')
