"""Small random transformers models for the parity tests (tests/test_convert.py,
tests/test_hf_parity.py): their initialisation, and a per-module factory."""

__all__ = ['randomize', 'model_factory']


def randomize(torch, model):
    """Give ``model`` weights that keep activations O(1), rounded to bf16 so
    that conversion is lossless: RMSNorm gains 1 + N(0, 0.2^2), embeddings
    N(0, 1), biases and DeepSeek's score correction N(0, 0.1^2), matrices
    ``[..., out, in]`` N(0, 1/in).  Returns the model (float32, eval mode)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif 'embed' in name:
                p.normal_()
            elif p.dim() == 1:
                p.normal_(std=0.1)
            else:
                p.normal_(std=p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith('e_score_correction_bias'):
                b.normal_(std=0.1)
    return model.to(torch.bfloat16).to(torch.float32).eval()


def model_factory(tmp_path_factory, build):
    """make(name) -> ``build(torch, transformers, name, directory)``, made once
    per name (skips the test without torch and transformers)."""
    import pytest
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('hf')
    made = {}

    def make(name):
        if name not in made:
            made[name] = build(torch, transformers, name, root / name)
        return made[name]

    return make
