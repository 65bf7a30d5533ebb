"""The JSONL output formats, one line per sequence in input order, and their
reader.

- mpimoe's own line: ``{"id", "text", "tokens", "finish_reason", "usage":
  {"prompt_tokens", "completion_tokens"}}`` (``text`` null without a
  tokenizer).
- For an OpenAI batch input, the line OpenAI's Batch API writes:
  ``{"id": "batch_req_...", "custom_id", "response": {"status_code": 200,
  "request_id", "body": <a completion or chat.completion object>}, "error":
  null}``, so tooling written for OpenAI batch output reads it.  The ids are
  derived from the run's identity and the sequence's index (the same in a
  resumed run) and ``created`` is when the run first started.

    line = result_line('doc-1', 'Hi', [5, 7], 'stop', 3)
    line = openai_line('r1', 'Hi', 'stop', 3, 2, ('chat', 'm'), created, key)
"""

import hashlib
import json

import numpy as np
from mpimoe.errors import DataError

__all__ = ['result_line', 'openai_line', 'iter_result_lines', 'read_result_lines']


def _dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(',', ':'))


def result_line(seq_id, text, tokens, finish_reason, prompt_tokens):
    """mpimoe's JSONL line of one sequence (no newline); tokens: int array [n]."""
    tokens = np.asarray(tokens).tolist()
    return _dumps({'id': seq_id, 'text': text, 'tokens': tokens, 'finish_reason': finish_reason,
                   'usage': {'prompt_tokens': int(prompt_tokens),
                             'completion_tokens': len(tokens)}})


def openai_line(seq_id, text, finish_reason, prompt_tokens, completion_tokens, request,
                created, key):
    """The OpenAI batch output line of one sequence (no newline).

    request: (endpoint 'completions' | 'chat', model); created: Unix time of
    the run's start; key: a str unique to this run and sequence, from which
    the line's ids are derived (hex of its sha256)."""
    endpoint, model = request
    h = hashlib.sha256(key.encode()).hexdigest()
    usage = {'prompt_tokens': int(prompt_tokens), 'completion_tokens': int(completion_tokens),
             'total_tokens': int(prompt_tokens) + int(completion_tokens)}
    if endpoint == 'chat':
        body = {'id': f'chatcmpl-{h[:24]}', 'object': 'chat.completion', 'created': created,
                'model': model, 'choices': [{
                    'index': 0, 'message': {'role': 'assistant', 'content': text},
                    'logprobs': None, 'finish_reason': finish_reason}], 'usage': usage}
    else:
        body = {'id': f'cmpl-{h[:24]}', 'object': 'text_completion', 'created': created,
                'model': model, 'choices': [{'index': 0, 'text': text, 'logprobs': None,
                                             'finish_reason': finish_reason}], 'usage': usage}
    return _dumps({'id': f'batch_req_{h[24:48]}', 'custom_id': seq_id,
                   'response': {'status_code': 200, 'request_id': h[48:], 'body': body},
                   'error': None})


def _fields(obj):
    """(id, text, tokens or None, finish_reason, prompt_tokens,
    completion_tokens) of one parsed line of either shape; KeyError,
    TypeError, IndexError or ValueError when it has neither."""
    if 'custom_id' in obj:
        body = obj['response']['body']
        choice = body['choices'][0]
        text = choice['message']['content'] if 'message' in choice else choice['text']
        usage = body['usage']
        return (str(obj['custom_id']), text, None, choice['finish_reason'],
                int(usage['prompt_tokens']), int(usage['completion_tokens']))
    usage = obj['usage']
    tokens = np.array(obj['tokens'], dtype=np.int32)
    return (str(obj['id']), obj['text'], tokens, obj['finish_reason'],
            int(usage['prompt_tokens']), int(usage['completion_tokens']))


def iter_result_lines(path):
    """Yield (line number, fields of :func:`_fields`) of a JSONL output;
    DataError naming the line for one that is neither shape."""
    with open(path, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, _fields(json.loads(raw))
            except (ValueError, KeyError, TypeError, IndexError, AttributeError,
                    RecursionError):
                raise DataError(f'{path}:{lineno}: not an mpimoe result line (id, text, tokens, '
                                'finish_reason, usage) nor an OpenAI batch output line') from None


def read_result_lines(path):
    """A JSONL output, whole -> the dict of mpimoe.io.outputs.read_outputs
    (generated None for OpenAI lines, which carry no token ids)."""
    rows = [fields for _, fields in iter_result_lines(path)]
    if not rows:
        raise DataError(f'{path}: no result lines')
    ids, texts, tokens, reasons, prompts, completions = zip(*rows)
    return {'ids': list(ids), 'text': list(texts),
            'generated': None if any(t is None for t in tokens) else list(tokens),
            'last_logits': None, 'finish_reason': list(reasons),
            'prompt_tokens': np.array(prompts, np.int32),
            'completion_tokens': np.array(completions, np.int32), 'meta': {}}
