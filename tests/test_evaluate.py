"""scoring.evaluate end to end, and the evaluate / generate commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_diffusion.config import load_config
from lora_diffusion.scoring import evaluate, format_table, write_eval_outputs

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"sentence": f"a good film number {i} ", "label": int(i % 3 == 0), "idx": i} for i in range(10)]


@pytest.fixture
def sst2_dir(tmp_path):
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path / "data"


def _cfg(data_dir, tmp_path, *extra):
    return load_config(None, ["model.base=builtin:tiny", "model.max_length=64", f"task.data_dir={data_dir}",
                              f"task.cache_dir={tmp_path / 'cache'}", *extra])


class AlwaysPositive(nn.Module):
    """Writes 'positive' [SEP] [PAD]... into the target span (found after the prompt's second [SEP])."""

    def __init__(self, tok):
        super().__init__()
        self.ids = (tok.convert_tokens_to_ids("positive"), tok.sep_token_id, tok.pad_token_id)
        self.sep = tok.sep_token_id
        self.vocab = len(tok)
        self.weight = nn.Parameter(torch.zeros(1))
        self.modes: list[bool] = []

    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        self.modes.append(self.training)
        span_start = ((x_t == self.sep).long().cumsum(1) >= 2).long().argmax(1) + 1
        rows, cols = positions.nonzero(as_tuple=True)
        offset = (cols - span_start[rows]).clamp(max=2)
        wanted = torch.tensor(self.ids)[offset]
        return nn.functional.one_hot(wanted, self.vocab).float() * 5


def test_evaluate_scores_generated_label_words(sst2_dir, tmp_path, tiny_base):
    _, tok = tiny_base
    model = AlwaysPositive(tok).train()
    metrics, preds = evaluate(model, tok, _cfg(sst2_dir, tmp_path), batch_size=3)
    positives = sum(r["label"] for r in ROWS)
    assert metrics["accuracy"] == pytest.approx(100 * positives / len(ROWS))
    assert metrics["non_label_rate"] == 0.0 and metrics["n_examples"] == 10.0
    assert {"denoise_acc", "denoise_acc_t25", "denoise_acc_t50", "denoise_acc_t75"} <= set(metrics)
    assert not any(k.startswith("eval_") for k in metrics)
    assert [p["prediction"] for p in preds] == ["positive"] * 10
    assert preds[3] == {"index": 3, "instruction": "Classify the sentiment of the movie review as positive or negative.",
                        "input": ROWS[3]["sentence"], "reference": "positive", "references": ["positive"], "prediction": "positive",
                        "rank_prediction": "positive"}
    assert metrics["rank_accuracy"] == metrics["accuracy"]  # rank classification picks the same constant label
    assert not any(model.modes) and model.training  # ran in eval mode, mode restored
    m2, p2 = evaluate(model, tok, _cfg(sst2_dir, tmp_path), limit=4)
    assert m2["n_examples"] == 4.0 and len(p2) == 4


def test_evaluate_untrained_lora_diffusion_is_deterministic(sst2_dir, tmp_path, tiny_base):
    from lora_diffusion.methods import build_method

    denoiser, tok = tiny_base
    cfg = _cfg(sst2_dir, tmp_path, "sampling.strategy=sample", "sampling.top_k=20", "sampling.steps=2")
    model = build_method(cfg.method, denoiser)
    a = evaluate(model, tok, cfg, limit=6)
    b = evaluate(model, tok, cfg, limit=6)
    assert a == b
    assert 0.0 <= a[0]["accuracy"] <= 100.0 and a[0]["non_label_count"] + a[0]["accuracy"] * 6 / 100 <= 6


@pytest.mark.parametrize("sampling", [["sampling.steps=1"], ["sampling.steps=3"], ["sampling.steps=2", "sampling.block_length=2"]])
def test_rank_classification_reuses_the_samplers_first_step(sst2_dir, tmp_path, tiny_base, sampling):
    """Rank classification's answers are those of its own forward pass (rank_classify), without that pass: the
    sampler's first step is the same input (whole span masked, t = 1)."""
    from lora_diffusion.data import collator_for, make_dataset
    from lora_diffusion.methods import build_method
    from lora_diffusion.scoring import label_spans, rank_classify

    denoiser, tok = tiny_base
    cfg = _cfg(sst2_dir, tmp_path, *sampling)
    model = build_method(cfg.method, denoiser).eval()
    ds = make_dataset(cfg, tok, "validation")
    batch = collator_for(cfg, tok)([ds[i] for i in range(len(ds))])
    candidates = label_spans(tok, ["negative", "positive"], int(batch["target_mask"][0].sum()))
    with torch.no_grad():
        want = [["negative", "positive"][i] for i in rank_classify(model, batch, candidates, tok.mask_token_id).tolist()]
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    _, preds = evaluate(model, tok, cfg, batch_size=4)
    assert [p["rank_prediction"] for p in preds] == want
    n_batches, n_t = 3, len(cfg.sampling.denoise_t)  # 10 rows in batches of 4
    assert len(calls) == n_batches * (cfg.sampling.steps + n_t)  # generation and the paper's metric, no rank pass


@pytest.mark.parametrize("precision, autocast", [("fp32", False), ("bf16", True)])
def test_evaluation_runs_in_the_training_precision(sst2_dir, tmp_path, tiny_base, precision, autocast):
    """Every forward of the evaluation (generation, rank classification, the paper's metric) runs under
    train.precision's autocast, as the training step did."""
    from lora_diffusion.methods import build_method

    denoiser, tok = tiny_base
    model = build_method(_cfg(sst2_dir, tmp_path).method, denoiser)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    metrics, _ = evaluate(model, tok, _cfg(sst2_dir, tmp_path, f"train.precision={precision}"), limit=4)
    assert seen and set(seen) == {autocast}
    assert 0.0 <= metrics["accuracy"] <= 100.0 and 0.0 <= metrics["rank_accuracy"] <= 100.0
    assert not torch.is_autocast_enabled("cpu")  # only inside


def test_write_outputs_and_table(tmp_path):
    m, p = write_eval_outputs(tmp_path / "out", {"accuracy": 50.0}, [{"prediction": "é"}])
    assert json.loads(m.read_text()) == {"accuracy": 50.0}
    assert json.loads(p.read_text().splitlines()[0]) == {"prediction": "é"}
    assert "accuracy" in format_table({"accuracy": 50.0}, "t") and "50.00" in format_table({"accuracy": 50.0})


def _untrained_adapter(folder: Path, seed: int = 0) -> Path:
    from lora_diffusion.adapter import save_adapter
    from lora_diffusion.methods import build_method
    from lora_diffusion.model import load_base

    cfg = load_config(None, ["model.base=builtin:tiny", "model.max_length=64"])
    denoiser, _ = load_base(cfg.model)
    torch.manual_seed(seed)
    return save_adapter(build_method(cfg.method, denoiser), folder, cfg.model, cfg.method)


def test_evaluate_command_with_adapter(sst2_dir, tmp_path, capsys):
    from lora_diffusion.evaluate import main

    adapter = _untrained_adapter(tmp_path / "adapter")
    out = tmp_path / "eval"
    rc = main(["--adapter", str(adapter), "--task", "sst2", "--data-dir", str(sst2_dir), "--limit", "5", "--out", str(out),
               f"task.cache_dir={tmp_path / 'cache'}", "sampling.steps=2"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "sst2 / validation: 5 examples, adapter" in printed and "accuracy" in printed and "denoise_acc" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_examples"] == 5.0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5
    assert "steps: 2" in (out / "config.yaml").read_text()


def test_evaluate_command_bad_input(tmp_path, capsys):
    from lora_diffusion.evaluate import main

    assert main(["--base", "builtin:tiny", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "task.data_dir=" in capsys.readouterr().err
    assert main(["--base", "builtin:tiny", "task.nme=sst2"]) == 2
    assert "task.nme: unknown key" in capsys.readouterr().err
    assert main(["--base", "builtin:tiny", "--limit", "0"]) == 2


@pytest.mark.timeout(120)
def test_generate_command_composes_adapters(tmp_path):
    a = _untrained_adapter(tmp_path / "a", seed=1)
    b = _untrained_adapter(tmp_path / "b", seed=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_diffusion.generate", "--adapter", str(a), "--adapter", str(b), "--task", "sst2",
         "--prompt", "a good film", "--prompt", "the worst movie", "--json", "sampling.steps=2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["a good film", "the worst movie"]
    assert all(isinstance(line["output"], str) for line in lines)


def test_evaluate_on_real_sst2(shared_data, tmp_path, tiny_base):
    from lora_diffusion.methods import build_method

    denoiser, tok = tiny_base
    cfg = load_config(None, ["model.base=builtin:tiny", "model.max_length=128", f"task.data_dir={shared_data}",
                             f"task.cache_dir={tmp_path / 'cache'}", "task.eval_subset_size=24", "sampling.steps=2"])
    metrics, preds = evaluate(build_method(cfg.method, denoiser), tok, cfg)
    assert metrics["n_examples"] == 24.0 and len(preds) == 24
    assert preds[0]["reference"] in ("negative", "positive")


def test_several_adapters_load_as_uniform_composition(tmp_path):
    from lora_diffusion.evaluate import load_model
    from lora_diffusion.methods.lora_diffusion import ComposedLoRADiffusion

    paths = [str(_untrained_adapter(tmp_path / n, seed=i)) for i, n in enumerate("ab")]
    cfg = load_config(None, ["model.base=builtin:tiny", "model.max_length=64"])
    model, tok = load_model(cfg, paths, "cpu")
    assert isinstance(model, ComposedLoRADiffusion) and model.router is None and len(model.adapters) == 2
    assert all(a.denoiser is model.denoiser for a in model.adapters)
    single, _ = load_model(cfg, paths[:1], "cpu")
    assert type(single).__name__ == "LoRADiffusion"
