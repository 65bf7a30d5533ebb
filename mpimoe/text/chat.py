"""Chat templates: a checkpoint's Jinja2 template rendered as transformers'
``apply_chat_template`` renders it, in Jinja2's immutable sandbox (a template
from a checkpoint is untrusted code).

    template = ChatTemplate(source_text)
    text = template.render(messages, {'bos_token': '<s>', 'eos_token': '</s>'})
"""

import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

__all__ = ['ChatTemplate', 'check_messages']


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
        sees them.  A template error (its raise_exception, an undefined
        operation, a sandbox violation) -> ValueError(problem)."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         tools=None, documents=None, **special_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f'chat template failed: {e}') from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f'chat template failed: {type(e).__name__}: {e}') from None


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
