"""Every architecture ``mpimoe convert`` reads, against transformers' own classes.

For each of Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 (Mixtral:
tests/test_convert.py) a randomly initialised small model of the
transformers class (pinned: ``transformers==5.24.0`` in setup.py's ``hf``
extra) with bf16-exact weights is saved with ``save_pretrained``, converted,
and run by ``mpimoe reference`` and ``mpimoe run``:

- the reference's last-prompt-position logits are within PARITY_TOL of
  transformers' float32 ones, per sequence (relative L2);
- the engine gives the reference's greedy tokens and logits
  (tests/contract.py assert_matches_reference) on distributed layouts:
  DeepSeek-V3 on per-layer, packed:4 and 2 front-ends, each other
  architecture on one of them.

The conversion itself (bit for bit, FP8, refusals): tests/test_convert_archs.py.

**Tolerance.**  The weights are bf16-exact, so conversion is lossless and both
sides compute in FP32 from the same values (the converter's RoPE column
permutation for DeepSeek only reorders).  mpimoe rounds to bf16 (unit roundoff
u = 2^-9) where transformers does not: each expert's input, hidden
activations and output (the wire format contract, as for Mixtral) and the
keys and values it caches (MLA: the latent and the RoPE key).  As argued in
tests/test_convert.py, the expert roundings give at most 8u relative per MoE
layer on the last logits; the routed output is scaled by
``routed_scaling_factor`` s (DeepSeek-V3: 2.5 here), so its error counts
max(1, s) times; the cached keys and values are one rounding each (u
relative) entering the attention output linearly through the scores and the
weighted sum, at most 4u per layer with the same 2x amplification allowance:

    PARITY_TOL = sum over layers of (4u + 8u max(1, s) [MoE layers only]).

**Routing near ties.**  Top-k is chosen on FP32 scores that the two sides
compute from slightly different inputs; where a token's k-th and (k+1)-th
choice scores (or, with groups, its topk_group-th and next group scores) are
closer than the two evaluations' router logits can differ, the token may go
to another expert and its sequence's logits move by O(0.1).  The router
logits differ by at most |dh| |w_e| <= tol |h| |w_e| per expert
(Cauchy-Schwarz, with tol the bound above on the layers before it), a
sigmoid score by a quarter of that, a group score by twice a score.  Each
side's choices are counted per layer (transformers' router outputs, mpimoe's
MoELayer.take_counts); a sequence routed otherwise is accepted only where its
first such layer had a near tie by that bound, and is then not compared; at
least half of the sequences must be compared.
"""

import numpy as np
import pytest

from mpimoe.checkpoint.weights import WeightFile
from mpimoe.cli.main import main
from mpimoe.io.inputs import read_inputs, write_synthetic_inputs
from mpimoe.io.outputs import read_outputs
from contract import assert_matches_reference
from hf_models import model_factory, randomize
from mpirun import mpiexec

U = 2.0 ** -9                     # unit roundoff of bf16
RUN_TIMEOUT = 90
MAX_NEW = 4

_COMMON = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
               tie_word_embeddings=False)

#: name -> (config class, model class, config, engine layouts [(ranks, options)])
ARCHS = {
    # q/k/v biases, a gated shared expert, top-k weights not renormalised
    'qwen2-moe': ('Qwen2MoeConfig', 'Qwen2MoeForCausalLM',
                  dict(_COMMON, intermediate_size=64, moe_intermediate_size=32,
                       shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=False),
                  [(7, ['--placement', 'per-layer'])]),
    # per-head QK-norm, renormalised top-k, head_dim * heads != hidden
    'qwen3-moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                  dict(_COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
                  [(3, ['--placement', 'packed:4'])]),
    # QK-norm over all heads, MHA, top-3 not renormalised
    'olmoe': ('OlmoeConfig', 'OlmoeForCausalLM',
              dict(_COMMON, num_key_value_heads=4, intermediate_size=32, num_experts=6,
                   num_experts_per_tok=3, norm_topk_prob=False, eos_token_id=None),
              [(8, ['--frontends', '2', '--placement', 'per-layer'])]),
    # MLA (low-rank q), yarn RoPE, sigmoid group-limited routing with a score
    # bias and scaling, a shared expert, a leading dense layer
    'deepseek-v3': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                    dict(_COMMON, num_key_value_heads=4, intermediate_size=64,
                         moe_intermediate_size=24, first_k_dense_replace=1, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=24,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                         rope_scaling={'rope_type': 'yarn', 'factor': 4.0,
                                       'original_max_position_embeddings': 64,
                                       'beta_fast': 32, 'beta_slow': 1, 'mscale': 1.0,
                                       'mscale_all_dim': 1.0}),
                    [(9, ['--placement', 'per-layer']), (3, ['--placement', 'packed:4']),
                     (6, ['--frontends', '2', '--placement', 'packed:2'])]),
}
LAYOUTS = [(name, n, extra) for name, spec in ARCHS.items() for n, extra in spec[3]]


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
    """Factory: ARCHS name -> (checkpoint dir, float32 model, inputs, weights file,
    reference outputs), made once."""
    return model_factory(tmp_path_factory, _make)


def _make(torch, transformers, name, directory):
    config_cls, model_cls, spec, _ = ARCHS[name]
    torch.manual_seed(0)
    model = randomize(torch, getattr(transformers, model_cls)(
        getattr(transformers, config_cls)(**spec)))
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    model.to(torch.float32)
    inputs = directory / 'in.jsonl'
    write_synthetic_inputs(inputs, spec['vocab_size'], num_seqs=6, min_len=2, max_len=12, seed=1)
    weights = directory / 'w.h5'
    assert main(['convert', '--from-hf', str(directory), '--out', str(weights)]) == 0
    ref = directory / 'ref.h5'
    assert main(['reference', '--weights', str(weights), '--input', str(inputs), '--output',
                 str(ref), '--save-logits', '--max-new-tokens', str(MAX_NEW)]) == 0
    return directory, model, inputs, weights, read_outputs(ref)


def _layer_tols(cfg):
    """PARITY_TOL accumulated before and after each layer: [n_layers + 1]."""
    s = max(1.0, cfg.router.routed_scaling_factor)
    per = [4 * U + (8 * U * s if i >= cfg.n_dense_layers else 0) for i in range(cfg.n_layers)]
    return np.concatenate([[0.0], np.cumsum(per)])


def _hf_run(torch, model, seq):
    """transformers on one sequence: (last logits [V], {MoE layer: (router
    input float64 [T, d], expert counts int [E])})."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, 'gate', None)
        if gate is not None:
            def hook(mod, args, out, i=i):
                h = args[0].reshape(-1, args[0].shape[-1]).double().numpy()
                seen[i] = h, np.bincount(out[2].numpy().ravel(), minlength=mod.weight.shape[0])
            hooks.append(gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(seq, dtype=torch.long)[None]).logits[0, -1].numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def _mpimoe_run(model, seq):
    """The reference (in-process) on one sequence: (last logits [V], {MoE
    layer: expert counts int [E]})."""
    for layer in model.moe.values():
        layer.take_counts()
    _, logits = model.generate([np.asarray(seq)], 1)
    return logits[0], {i: layer.take_counts() for i, layer in model.moe.items()}


def _near_tie(cfg, h, gate, tol):
    """Whether any token of h [T, d] (the router input of an MoE layer) could
    pick other experts when its router logits move by the bound argued in the
    module docstring (``tol``: the relative error of h)."""
    w = gate.weight.detach().double().numpy()                                # [E, d]
    logits = h @ w.T                                                         # [T, E]
    slack = tol * np.linalg.norm(h, axis=1, keepdims=True) * np.linalg.norm(w, axis=1)
    if cfg.router.scoring == 'sigmoid':
        scores, slack = 1 / (1 + np.exp(-logits)), slack / 4
    else:
        scores = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        slack = slack * 2 * scores.max(axis=1, keepdims=True)   # |d softmax| <= 2 p_max |dz|
    bias = getattr(gate, 'e_score_correction_bias', None)
    choice = scores + (0 if bias is None else bias.double().numpy())
    eps = slack.max(axis=1)                                                  # [T]
    G, k = cfg.router.n_group, cfg.top_k
    if G > 1:
        groups = np.sort(choice.reshape(len(h), G, -1), axis=2)[:, :, -2:].sum(axis=2)
        order = np.sort(groups, axis=1)[:, ::-1]
        if np.any(order[:, cfg.router.topk_group - 1] - order[:, cfg.router.topk_group]
                  <= 4 * eps):
            return True
        keep = np.argsort(-groups, axis=1)[:, :cfg.router.topk_group]
        mask = np.zeros_like(groups, bool)
        np.put_along_axis(mask, keep, True, axis=1)
        choice = np.where(np.repeat(mask, choice.shape[1] // G, axis=1), choice, -np.inf)
    top = np.sort(choice, axis=1)[:, ::-1]
    return bool(np.any(top[:, k - 1] - top[:, k] <= 2 * eps))


@pytest.mark.timeout(300)
@pytest.mark.parametrize('name', ARCHS)
def test_reference_matches_transformers(name, hf_model):
    """Per sequence: where both chose the same experts (per layer, the same
    counts per expert), the last logits agree within PARITY_TOL; where they
    did not, the choice must have been a near tie (else the test fails)."""
    import torch
    from mpimoe.model.reference import load_reference
    directory, model, inputs, weights, ref = hf_model(name)
    with WeightFile(weights) as wf:
        cfg, mine = wf.config, load_reference(wf)
    tols = _layer_tols(cfg)
    seqs = read_inputs(inputs, cfg.vocab_size)
    compared, ties = [], 0
    for i in range(len(seqs)):
        hf, seen = _hf_run(torch, model, seqs.seq(i))
        logits, counts = _mpimoe_run(mine, seqs.seq(i))
        # the CLI batched it with the others: FP32 summation order only (module
        # docstring of mpimoe.model.attention), ~1e-6 here, far under bf16's 2^-9
        assert np.linalg.norm(logits - ref['last_logits'][i]) <= 1e-4 * np.linalg.norm(logits)
        diverged = [j for j in counts if not np.array_equal(counts[j], seen[j][1])]
        if diverged:
            assert all(_near_tie(cfg, seen[j][0], model.model.layers[j].mlp.gate, tols[j])
                       for j in diverged[:1]), f'sequence {i}: layer {diverged[0]} routed ' \
                f'otherwise than transformers without a near tie'
            ties += 1
            continue
        compared.append(np.linalg.norm(logits - hf) / np.linalg.norm(hf))
    print(f'{name}: relative L2 difference of {len(compared)}/{len(seqs)} sequences '
          f'{", ".join(f"{r:.2g}" for r in compared)}, tolerance {tols[-1]:.3g}; '
          f'{ties} routed otherwise at a near tie')
    assert len(compared) >= len(seqs) / 2
    assert np.all(np.array(compared) <= tols[-1])


@pytest.mark.timeout(2 * RUN_TIMEOUT)
@pytest.mark.parametrize('name, n, extra', LAYOUTS,
                         ids=[f'{name}-{n}{"".join(extra)}' for name, n, extra in LAYOUTS])
def test_engine_matches_reference(name, n, extra, hf_model, tmp_path):
    _, _, inputs, weights, ref = hf_model(name)
    out = tmp_path / 'run.h5'
    proc = mpiexec(n, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--max-new-tokens', MAX_NEW, '--save-logits', *extra],
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert_matches_reference(read_outputs(out), ref, str(weights), str(inputs))

