"""``mpimoe convert``: a Hugging Face MoE checkpoint -> an mpimoe weight file.

The source is a directory as ``save_pretrained`` writes it: ``config.json``
plus ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.
Accepted: the architectures of :mod:`mpimoe.checkpoint.hf_archs` (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3), whose config maps to a
:class:`~mpimoe.model.config.ModelConfig` and whose tensors map one to one to
the layout (DeepSeek's RoPE columns reordered).

    summary = convert_hf('Mixtral-8x7B/', 'mixtral.h5')   # {'path', 'tensors', ...}

The tokenizer files of the directory (``tokenizer.json`` and the others of
``TOKENIZER_FILES`` beside it) are copied into the weight file when
``tokenizer.json`` is there (:mod:`mpimoe.checkpoint.tokenizer_files`).  The
end-of-sequence ids are ``generation_config.json``'s ``eos_token_id`` when it
gives one (transformers' ``generate`` stops there; chat models list their
end-of-turn token), else ``config.json``'s.

Everything is checked before anything is written: config features mpimoe does
not implement, missing or unexpected tensors, shapes against config.json,
dtypes, FP8 block scales, and a tokenizer that does not parse or has more
tokens than the model's vocabulary; the problems are listed in one
:class:`~mpimoe.errors.DataError`.
Safetensors files are parsed here (8-byte little-endian header length, JSON
header, raw data) and memory-mapped, so the conversion needs no PyTorch and
holds one tensor at a time in memory.  Torch ``Linear`` weights are
``[out, in]``; mpimoe stores ``[in, out]`` (``y = x @ W``), so matrices are
transposed.  F32 and F16 sources are rounded to bfloat16 (nearest-even); FP8
(``F8_E4M3`` with ``weight_scale_inv`` block scales, as DeepSeek-V3 ships)
is dequantized block by block in FP32, then rounded to bfloat16.  The
router's score bias stays FP32.
"""

import os
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mpimoe.checkpoint.hf_archs import hf_model_config, hf_source, listed, rope_order
from mpimoe.checkpoint.layout import FP32, WORD, tensor_dtype, tensor_specs
from mpimoe.checkpoint.tokenizer_files import load_tokenizer, write_tokenizer_files
from mpimoe.checkpoint.writer import LOG_EVERY_S, open_for_writing, write_tensor
from mpimoe.model.config import parse_json
from mpimoe.errors import DataError, clip
from mpimoe.io.paths import regular_file

__all__ = ['convert_hf']

#: safetensors dtype -> NumPy dtype of the stored values (little-endian)
_ST_DTYPES = {'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype('<f2'),
              'F32': np.dtype('<f4'), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn)}
#: largest safetensors JSON header accepted (the format's own limit)
_MAX_HEADER = 100_000_000
#: tensors some checkpoints carry that transformers ignores on load (RoPE
#: frequencies, recomputed from rope_theta)
_IGNORED = '.rotary_emb.inv_freq'
#: the block scales of an FP8 tensor ``NAME``: ``NAME + _SCALE``
_SCALE = '_scale_inv'


def _eos_ids(hf, generation):
    """The end-of-sequence ids: ``eos_token_id`` of generation_config.json
    (dict ``generation``) unless absent or null, else of config.json (``hf``);
    an int, a list of ints, or null/absent (none) -> (tuple, whether it came
    from generation_config.json).  ModelConfig checks the ids."""
    given = generation.get('eos_token_id') is not None
    value = generation['eos_token_id'] if given else hf.get('eos_token_id')
    if value is None:
        return (), given
    return (tuple(value) if isinstance(value, list) else (value,)), given


def _fp8_block(hf):
    """(block rows, block cols) of config.json's FP8 ``quantization_config``,
    None without one, or a problem string when it is not one mpimoe reads."""
    q = hf.get('quantization_config')
    if q is None:
        return None
    block = q.get('weight_block_size') if isinstance(q, dict) else None
    if not (isinstance(q, dict) and q.get('quant_method') == 'fp8'
            and q.get('fmt', 'e4m3') == 'e4m3' and isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        return (f'quantization_config {clip(repr(q))}: only FP8 e4m3 with a '
                f'weight_block_size [rows, cols] (DeepSeek-V3)')
    return tuple(block)


# ---------------------------------------------------------------- safetensors

def _read_header(path):
    """(entries {name: dict(dtype, shape, data_offsets)}, data start byte) of one
    safetensors file; DataError when the header is not readable."""
    regular_file(path, 'safetensors shard')
    with open(path, 'rb') as f:
        raw = f.read(8)
        n = int.from_bytes(raw, 'little') if len(raw) == 8 else -1
        if not 2 <= n <= _MAX_HEADER:
            raise DataError(f'{path}: not a safetensors file (header length {n}); '
                            f're-download or re-save it')
        header = parse_json(f.read(n), f'{path}: safetensors header', DataError)
    if not isinstance(header, dict):
        raise DataError(f'{path}: safetensors header is not a JSON object')
    header.pop('__metadata__', None)
    return header, 8 + n


class _Source:
    """The tensors of a checkpoint directory: where each one lies and its header entry.

    ``entries[hf_name] = (shard path, header entry)``; ``indexed[hf_name]`` is
    the shard file the index names (for messages about a tensor it lacks).
    """

    def __init__(self, directory):
        self.directory = directory
        self.entries, self.indexed, self._start = {}, {}, {}
        for shard, names in self._shards().items():
            header, self._start[shard] = _read_header(shard)
            if names is not None:
                self.indexed.update({n: os.path.basename(shard) for n in names})
            self.entries.update({n: (shard, header[n]) for n in
                                 (header if names is None else names) if n in header})

    def _shards(self):
        """{shard path: [names it should hold] or None (all its tensors)}."""
        index = os.path.join(self.directory, 'model.safetensors.index.json')
        single = os.path.join(self.directory, 'model.safetensors')
        regular_file(index, 'index')
        regular_file(single, 'safetensors file')
        if os.path.isfile(index):
            return self._indexed(index)
        if os.path.isfile(single):
            return {single: None}
        raise DataError(f'{self.directory}: neither model.safetensors nor '
                        f'model.safetensors.index.json; is it a safetensors checkpoint?')

    def _indexed(self, index):
        doc = _read_json(index)
        try:
            weight_map = doc['weight_map']
            shards = {}
            for name, shard in weight_map.items():
                shards.setdefault(os.path.join(self.directory, shard), []).append(name)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f'{index}: not a valid index (needs a "weight_map" object of '
                            f'tensor -> shard file): {clip(repr(e))}') from None
        absent = sorted(os.path.basename(s) for s in shards if not os.path.exists(s))
        if absent:
            raise DataError(listed(f'{index}: shard files missing', map(clip, absent)))
        return shards

    def problem(self, name, shape, dtypes=_ST_DTYPES):
        """What is wrong with tensor ``name`` expected as ``shape`` in one of
        ``dtypes``, or None."""
        shard, e = self.entries[name]
        try:
            dtype, got, (a, b) = e['dtype'], tuple(e['shape']), map(int, e['data_offsets'])
        except (KeyError, TypeError, ValueError):
            return f'{name}: malformed header entry {clip(repr(e))}'
        if got != shape:
            return f'{name}: shape {clip(list(got))}, config.json implies {list(shape)}'
        if dtype not in dtypes:
            return f'{name}: dtype {clip(dtype)} (only {", ".join(dtypes)})'
        size = os.path.getsize(shard) - self._start[shard]
        if not 0 <= a <= b <= size or b - a != int(np.prod(shape)) * _ST_DTYPES[dtype].itemsize:
            return f'{name}: data_offsets {[a, b]} do not fit {list(shape)} {dtype} in ' \
                   f'{os.path.basename(shard)} (truncated?)'
        return None

    def dtype(self, name):
        """The safetensors dtype name of tensor ``name`` ('BF16', ...)."""
        return self.entries[name][1]['dtype']

    def read(self, name):
        """Tensor ``name`` memory-mapped, read-only, in its stored dtype."""
        shard, e = self.entries[name]
        return np.memmap(shard, dtype=_ST_DTYPES[e['dtype']], mode='r', shape=tuple(e['shape']),
                         offset=self._start[shard] + e['data_offsets'][0])


# ---------------------------------------------------------------- checks

@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: mpimoe ``name`` and ``shape`` from Hugging Face
    tensor ``hf`` of ``hf_shape`` (``transposed``: [out, in] -> [in, out]),
    its columns then taken in ``order`` (int [out], or None)."""
    name: str
    shape: tuple
    hf: str
    hf_shape: tuple
    transposed: bool
    order: object = None


def _expected(cfg, arch, hf):
    """[_Tensor] of ``cfg`` in storage order."""
    interleaved = bool(hf.get('rope_interleave'))
    out = []
    for name, shape in tensor_specs(cfg):
        source, transposed = hf_source(name, arch)
        out.append(_Tensor(name, shape, source, shape[::-1] if transposed else shape,
                           transposed, rope_order(name, cfg, interleaved)))
    return out


def _skipped(name, cfg, mtp):
    """Whether source tensor ``name`` is one convert leaves out on purpose:
    RoPE buffers, and the ``mtp`` layers after the last (DeepSeek's
    multi-token prediction, ``num_nextn_predict_layers``)."""
    if name.endswith(_IGNORED):
        return True
    parts = name.split('.')
    return len(parts) > 2 and parts[:2] == ['model', 'layers'] and parts[2].isdigit() \
        and cfg.n_layers <= int(parts[2]) < cfg.n_layers + mtp


def _mtp(hf):
    """DeepSeek's multi-token-prediction layers in the checkpoint (0: none)."""
    n = hf.get('num_nextn_predict_layers')
    return n if isinstance(n, int) and n > 0 else 0


def _tensor_problems(source, expected, cfg, block, mtp):
    """Missing, unexpected, misshapen and unreadable tensors and FP8 scales: [str]."""
    wanted = {t.hf for t in expected}
    scales = {t.hf + _SCALE for t in expected}
    problems = []
    fp8 = {t.hf + _SCALE for t in expected
           if t.hf in source.entries and source.dtype(t.hf) == 'F8_E4M3' and len(t.hf_shape) == 2}
    missing = [hf + (f' (absent from {source.indexed[hf]})' if hf in source.indexed else '')
               for hf in sorted(wanted | fp8) if hf not in source.entries]
    extra = sorted(n for n in set(source.entries) - wanted - scales if not _skipped(n, cfg, mtp))
    if missing:
        problems.append(listed('missing tensors', missing))
    if extra:
        problems.append(listed('unexpected tensors (a feature mpimoe lacks, e.g. biases '
                               'or shared experts?)', extra))
    bad = [p for t in expected if t.hf in source.entries
           for p in [source.problem(t.hf, t.hf_shape) or _scale_problem(source, t, block)] if p]
    if bad:
        problems.append(listed('bad tensors', bad))
    return problems


def _scale_problem(source, t, block):
    """What is wrong with the FP8 scales of ``t`` (an FP8 tensor), or None."""
    if source.dtype(t.hf) != 'F8_E4M3':
        return None
    if len(t.hf_shape) != 2:
        return f'{t.hf}: dtype F8_E4M3 (only matrices may be FP8; BF16, F16, F32 here)'
    if block is None or isinstance(block, str):
        return f'{t.hf}: FP8 needs a config.json quantization_config with weight_block_size'
    scale = t.hf + _SCALE
    if scale not in source.entries:
        return None                                     # listed as missing
    want = tuple(-(-n // b) for n, b in zip(t.hf_shape, block))
    return source.problem(scale, want, ('F32',))


def _read_json(path):
    """The JSON document in the regular file ``path``; one-line DataError when it
    is not one (FileNotFoundError passes through)."""
    regular_file(path, 'JSON file')
    with open(path, 'rb') as f:
        return parse_json(f.read(), path, DataError)


def _read_config(directory):
    """config.json of ``directory`` as a dict; one-line DataError when absent or bad."""
    if not os.path.isdir(directory):
        raise DataError(f'{directory}: no such directory; pass the directory holding '
                        f'config.json and the *.safetensors files')
    path = os.path.join(directory, 'config.json')
    try:
        hf = _read_json(path)
    except FileNotFoundError:
        raise DataError(f'{path}: missing; is {directory} a Hugging Face checkpoint '
                        f'directory?') from None
    if not isinstance(hf, dict):
        raise DataError(f'{path}: not a JSON object')
    return hf


def _read_generation_config(directory):
    """generation_config.json of ``directory`` as a dict, {} when absent;
    one-line DataError when it is not a JSON object."""
    path = os.path.join(directory, 'generation_config.json')
    try:
        doc = _read_json(path)
    except FileNotFoundError:
        return {}
    if not isinstance(doc, dict):
        raise DataError(f'{path}: not a JSON object')
    return doc


@dataclass
class _Conversion:
    """What :func:`_check` found convertible: the model ``cfg`` of ``arch``,
    the ``source`` tensors, the ``expected`` [_Tensor], ``tokenizer`` (the
    ``(files, TextTokenizer)`` of the directory, or None without
    tokenizer.json), the lines ``notes`` to log and the FP8 ``block`` (or None)."""
    cfg: object
    arch: str
    source: object
    expected: list
    tokenizer: object
    notes: list
    block: object


def _check(directory):
    """-> _Conversion when ``directory`` is convertible, else DataError
    listing every problem."""
    hf, problems = _read_config(directory), []
    try:
        generation = _read_generation_config(directory)
    except DataError as e:
        generation = {}
        problems.append(str(e))
    eos, from_generation = _eos_ids(hf, generation)
    cfg, arch, config_problems = hf_model_config(
        hf, eos, 'generation_config.json' if from_generation else 'config.json')
    problems += config_problems
    block = _fp8_block(hf)
    if isinstance(block, str):
        problems.append(block)
    try:
        source = _Source(directory)
    except DataError as e:
        source = None
        problems.append(str(e))
    expected = _expected(cfg, arch, hf) if cfg is not None else []
    if cfg is not None and source is not None:
        problems += _tensor_problems(source, expected, cfg, block, _mtp(hf))
    tokenizer = None
    if cfg is not None and os.path.isfile(os.path.join(directory, 'tokenizer.json')):
        try:
            tokenizer = load_tokenizer(directory, cfg.vocab_size)
        except DataError as e:
            problems.append(str(e))
    if problems:
        raise DataError(f'{directory}: cannot convert: ' + '; '.join(problems))
    return _Conversion(cfg, arch, source, expected, tokenizer,
                       _notes(directory, hf, cfg, source, expected, block), block)


def _notes(directory, hf, cfg, source, expected, block):
    """convert's lines about what it changes or leaves out."""
    notes = []
    kinds = sorted({source.dtype(t.hf) for t in expected} - {'BF16', 'F8_E4M3'})
    if kinds:
        notes.append(f'note: {directory} stores {"/".join(kinds)} tensors; rounding them to '
                     f'bfloat16 (nearest-even)')
    fp8 = sum(source.dtype(t.hf) == 'F8_E4M3' for t in expected)
    if fp8:
        notes.append(f'note: dequantizing {fp8} FP8 (e4m3) tensors with their {block[0]}x'
                     f'{block[1]} block scales to bfloat16 (the weight file is about twice the '
                     f'size of the checkpoint)')
    mtp = [n for n in source.entries if _skipped(n, cfg, _mtp(hf)) and not n.endswith(_IGNORED)]
    if mtp:
        last = cfg.n_layers + _mtp(hf) - 1
        layers = f'{cfg.n_layers}..{last}' if last > cfg.n_layers else str(last)
        notes.append(f'note: skipping the {len(mtp)} tensor(s) of the multi-token-prediction '
                     f'layer(s) {layers}: inference does not use them')
    if any(t.order is not None for t in expected):
        notes.append('note: reordering the interleaved RoPE columns of the queries and the '
                     'RoPE key to rotate-half (the scores are unchanged)')
    return notes


def _tokenizer_note(directory, tokenizer):
    """convert's line about the tokenizer it copies (or finds none)."""
    if tokenizer is None:
        return (f'note: {directory} has no tokenizer.json, so the weight file carries no '
                f'tokenizer; text inputs then need --tokenizer at run time')
    files, tok = tokenizer
    return (f'tokenizer: copying {", ".join(files)} ({tok.vocab_size} tokens, chat template: '
            f'{"yes" if tok.has_chat_template else "no"})')


# ---------------------------------------------------------------- writing

def _values(source, t, cfg, block):
    """Tensor ``t`` as mpimoe stores it: FP32 values of an FP32 tensor of the
    layout, else uint16 words of bfloat16 (BF16 sources bit for bit, others
    rounded to nearest-even, FP8 dequantized first); transposed and its
    columns reordered, C-contiguous."""
    a = source.read(t.hf)
    if a.dtype == _ST_DTYPES['F8_E4M3']:
        scale = np.asarray(source.read(t.hf + _SCALE), np.float32)
        rows, cols = block
        full = np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)[:a.shape[0], :a.shape[1]]
        a = a.astype(np.float32) * full
    if t.transposed:
        a = a.T
    if t.order is not None:
        a = a[:, t.order]
    if tensor_dtype(t.name, cfg) == 'float32':
        return np.ascontiguousarray(a, FP32)
    if a.dtype == _ST_DTYPES['BF16']:
        return np.ascontiguousarray(a).view(WORD)
    return np.ascontiguousarray(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)).view(WORD)


def convert_hf(directory, out, overwrite=False, log=None):
    """Convert the Hugging Face checkpoint in ``directory`` to ``out``.

    Checks everything first (DataError listing every problem), then writes
    tensor by tensor to ``out + '.partial'`` and renames it.  Peak memory is
    about twice the largest tensor (FP8: its FP32 dequantization, twice
    more).  Returns ``{'path', 'tensors', 'bytes', 'seconds', 'config'}``.
    """
    log = log or (lambda line: None)
    c = _check(directory)
    cfg, expected = c.cfg, c.expected
    t0 = last = time.monotonic()
    total = 0
    with open_for_writing(out, cfg, overwrite) as f:
        for line in c.notes:
            log(line)
        log(f'converting {directory} ({c.arch}) -> {out}: {len(expected)} tensors, '
            f'{cfg.n_layers} layers x {cfg.n_experts} experts (top-{cfg.top_k}), '
            f'd_model {cfg.d_model}')
        log(_tokenizer_note(directory, c.tokenizer))
        if c.tokenizer is not None:
            write_tokenizer_files(f, c.tokenizer[0])
        for t in expected:
            values = _values(c.source, t, cfg, c.block)
            total += write_tensor(f, t.name, t.shape, tensor_dtype(t.name, cfg),
                                  [(0, t.shape[0], values)])
            if time.monotonic() - last >= LOG_EVERY_S:
                last = time.monotonic()
                log(f'  {total / 1e9:.3f} GB  {last - t0:.0f} s  {t.name}')
    secs = time.monotonic() - t0
    log(f'wrote {out}: {len(expected)} tensors, {total / 1e9:.3f} GB in {secs:.1f} s')
    return {'path': out, 'tensors': len(expected), 'bytes': total, 'seconds': secs,
            'config': cfg}
