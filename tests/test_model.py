import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import GPT, GPTConfig

# Published GPT-2 sizes (vocab 50257, block 1024, tied embeddings) and our tiny preset.
EXPECTED_PARAMS = {
    "tiny": 478_720,
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", GPTConfig.presets())
def test_exact_parameter_count(name):
    with torch.device("meta"):  # shapes only: gpt2-xl would need 6 GB
        model = GPT(GPTConfig.preset(name))
    assert model.num_params() == EXPECTED_PARAMS[name]


def test_every_preset_has_an_expected_count():
    assert set(GPTConfig.presets()) == set(EXPECTED_PARAMS)


def test_embedding_is_tied_to_lm_head():
    model = GPT(GPTConfig.preset("tiny"))
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig.preset("tiny"),
        GPTConfig(vocab_size=1000, block_size=64, n_layer=3, n_head=2, n_embd=64, vocab_multiple=64),
    ],
    ids=["tiny", "padded-vocab"],
)
def test_flops_per_token_matches_flop_counter(cfg):
    """Analytic count vs torch's FlopCounterMode on a real forward + backward.

    The math SDPA backend is forced because the CPU flash kernel has no FLOP formula (its
    attention FLOPs would be silently missing). The counter sees only matmuls, as our
    formula does: on torch 2.13 the two agree exactly. The test allows 1% so that a
    torch release counting one more small op (an embedding backward, say) still passes.
    """
    model = GPT(cfg)
    B, T = 2, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx).float().logsumexp(-1).mean().backward()
    counted = counter.get_total_flops()
    analytic = model.flops_per_token(T) * B * T
    assert abs(counted - analytic) / counted < 0.01, (counted, analytic)


def test_padding_keeps_logits_at_vocab_size():
    cfg = GPTConfig.preset("tiny", vocab_size=500, vocab_multiple=64)
    assert cfg.padded_vocab_size == 512
    logits = GPT(cfg)(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, 500)


def test_init_depends_on_seed_only():
    cfg = GPTConfig.preset("tiny")
    torch.manual_seed(123)  # the global RNG must not matter
    a = GPT(cfg, seed=7).state_dict()
    torch.manual_seed(456)
    b = GPT(cfg, seed=7).state_dict()
    c = GPT(cfg, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_residual_projections_get_scaled_init():
    cfg = GPTConfig.preset("tiny", n_layer=8)
    model = GPT(cfg)
    proj = model.blocks[0].mlp.c_proj.weight.std().item()
    fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert proj == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert fc == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "overrides, field",
    [(dict(n_head=3), "n_embd"), (dict(n_layer=0), "n_layer"), (dict(vocab_size=-1), "vocab_size")],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig.preset("tiny", **overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2-small"):
        GPTConfig.preset("gpt5")


def test_sequence_longer_than_block_is_refused():
    model = GPT(GPTConfig.preset("tiny"))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 129, dtype=torch.long))
