"""Data loading (local JSON Lines and the Hub path), checks, subsets, the tokenisation cache, the collator."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lora_diffusion import data as data_mod
from lora_diffusion.collator import Collator
from lora_diffusion.config import load_config
from lora_diffusion.data import collator_for, load_split, make_dataset, subset_indices
from lora_diffusion.tasks import DataError

SST2_ROWS = [{"sentence": f"a good film number {i} ", "label": i % 2, "idx": i} for i in range(12)]
SQUAD_ROW = {"id": "x", "title": "T", "context": "the city is by the sea and has a team", "question": "what is by the sea?",
             "answers": {"text": ["the city", "city"], "answer_start": [0, 4]}}
XSUM_ROWS = [{"document": f"the team won game {i}.\nthe city is happy.", "summary": f"team wins game {i}.", "id": str(i)} for i in range(5)]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg_for(data_dir, tmp_path, *extra):
    return load_config(None, ["model.base=builtin:tiny", "model.max_length=160", f"task.data_dir={data_dir}",
                              f"task.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.fixture
def local_data(tmp_path):
    root = tmp_path / "data"
    write_jsonl(root / "sst2" / "train.jsonl", SST2_ROWS)
    write_jsonl(root / "sst2" / "validation.jsonl", SST2_ROWS[:4])
    squad = [{**SQUAD_ROW, "id": str(i)} for i in range(6)]
    write_jsonl(root / "squad" / "validation.jsonl", squad)
    write_jsonl(root / "squad" / "dev_split" / "train.jsonl", squad[:4])
    write_jsonl(root / "squad" / "dev_split" / "validation.jsonl", squad[4:])
    write_jsonl(root / "xsum" / "train.jsonl", XSUM_ROWS)
    write_jsonl(root / "xsum" / "validation.jsonl", XSUM_ROWS[:2])
    return root


# --------------------------------------------------------------------------- local files


def test_local_files_load_for_every_task(local_data, tmp_path, tiny_base):
    _, tok = tiny_base
    for task, n_train in (("sst2", 12), ("squad", 4), ("xsum", 5)):
        cfg = cfg_for(local_data, tmp_path, f"task.name={task}")
        ds = make_dataset(cfg, tok, "train")
        assert len(ds) == n_train
        item = ds[1]
        assert set(item) == {"instruction_ids", "context_ids", "target_ids", "index"} and item["index"] == 1
        instr, inp, tgt = ds.task.to_prompt_target(ds.example(1))
        assert tok.decode(item["target_ids"]) == tok.decode(tok(tgt, add_special_tokens=False)["input_ids"])
        assert item["instruction_ids"] == tok(instr, add_special_tokens=False)["input_ids"]
        batch = collator_for(cfg, tok)([ds[i] for i in range(len(ds))])
        assert batch["target_mask"].sum(1).tolist() == [ds.task.target_budget] * n_train


def test_data_dir_from_environment(local_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(local_data))
    cfg = load_config(None, [f"task.cache_dir={tmp_path / 'cache'}"])
    assert len(load_split(cfg.task, "validation")) == 4
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="LORA_DIFFUSION_DATA_DIR=.*nowhere.*does not exist"):
        load_split(cfg.task, "validation")


def test_squad_split_mapping(local_data, tmp_path):
    cfg = cfg_for(local_data, tmp_path, "task.name=squad")
    assert len(load_split(cfg.task, "train")) == 4  # dev_split/train.jsonl (no official train.jsonl)
    assert len(load_split(cfg.task, "validation")) == 2  # dev_split/validation.jsonl, disjoint from train
    assert len(load_split(cfg.task, "full_validation")) == 6  # the whole official dev set
    assert len(load_split(cfg.task, "dev_split/train")) == 4  # a file stem works too
    write_jsonl(local_data / "squad" / "train.jsonl", [SQUAD_ROW] * 3)  # an official train file takes precedence
    assert len(load_split(cfg.task, "train")) == 3


def test_subsets_are_reproducible(local_data, tmp_path, tiny_base):
    _, tok = tiny_base
    a = make_dataset(cfg_for(local_data, tmp_path, "task.subset_size=5", "task.seed=1"), tok, "train")
    b = make_dataset(cfg_for(local_data, tmp_path, "task.subset_size=5", "task.seed=1"), tok, "train")
    c = make_dataset(cfg_for(local_data, tmp_path, "task.subset_size=5", "task.seed=2"), tok, "train")
    ia, ib, ic = ([d[i]["index"] for i in range(len(d))] for d in (a, b, c))
    assert len(ia) == 5 and ia == ib and ia != ic
    assert all(a.example(i)["idx"] == ia[i] for i in range(5))  # index = row of the file
    # eval_subset_size applies to the other splits
    v = make_dataset(cfg_for(local_data, tmp_path, "task.subset_size=5", "task.eval_subset_size=2"), tok, "validation")
    assert len(v) == 2
    assert subset_indices(10, None, 0) is None and subset_indices(10, 20, 0) is None


def test_tokenisation_cache_hit_on_second_load(local_data, tmp_path, tiny_base, monkeypatch):
    _, tok = tiny_base
    calls = []
    real = data_mod._tokenize_fn

    def counting(*args, **kwargs):
        fn = real(*args, **kwargs)

        def wrapped(batch):
            calls.append(len(next(iter(batch.values()))))
            return fn(batch)

        return wrapped

    monkeypatch.setattr(data_mod, "_tokenize_fn", counting)
    cfg = cfg_for(local_data, tmp_path, "task.name=xsum")
    first = make_dataset(cfg, tok, "train")
    assert calls and sum(calls) == 5
    assert any("cache-" in f["filename"] for f in first.examples.cache_files)
    calls.clear()
    second = make_dataset(cfg, tok, "train")
    assert calls == []  # loaded from the cache, not tokenised again
    assert [second[i] for i in range(5)] == [first[i] for i in range(5)]
    make_dataset(cfg_for(local_data, tmp_path, "task.name=xsum", "model.max_length=100"), tok, "train")
    assert sum(calls) == 5  # another length is another cache entry


def test_long_targets_are_counted_when_loading(local_data, tmp_path, tiny_base, caplog):
    _, tok = tiny_base
    cfg = cfg_for(local_data, tmp_path, "task.name=xsum", "task.target_budget=4")
    with caplog.at_level(logging.WARNING, logger="lora_diffusion.data"):
        make_dataset(cfg, tok, "train")
    assert "5 of 5 targets are longer than the target budget (4 tokens" in caplog.text


def test_max_length_too_small_for_instruction_is_an_error(local_data, tmp_path, tiny_base):
    _, tok = tiny_base
    cfg = cfg_for(local_data, tmp_path, "task.name=squad", "model.max_length=20")
    with pytest.raises(DataError, match=r"model.max_length=20 is too small for .*dev_split/train.jsonl line 1: .*need max_length >= \d+"):
        make_dataset(cfg, tok, "train")


# --------------------------------------------------------------------------- bad input


def test_hub_path_offline_names_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_DIFFUSION_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, [f"task.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError, match=r"glue/sst2 from the Hugging Face Hub .*set task.data_dir \(or env LORA_DIFFUSION_DATA_DIR\)"):
        load_split(cfg.task, "train")


def test_missing_data_folder(tmp_path):
    cfg = cfg_for(tmp_path / "absent", tmp_path)
    with pytest.raises(DataError, match=r"task.data_dir=.*absent.*folder does not exist"):
        load_split(cfg.task, "train")


def test_missing_task_folder_and_split_file(local_data, tmp_path):
    (local_data / "sst2" / "train.jsonl").unlink()
    cfg = cfg_for(local_data, tmp_path)
    with pytest.raises(DataError, match=r"split 'train': file .*sst2/train.jsonl does not exist \(files present: validation.jsonl\)"):
        load_split(cfg.task, "train")
    empty_root = tmp_path / "other"
    (empty_root / "xsum").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no folder 'sst2' in it .*folders present: xsum"):
        load_split(cfg_for(empty_root, tmp_path).task, "train")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"sentence": "fine", "idx": 0}], r"train.jsonl: field 'label' missing \(task 'sst2' needs sentence, label; the file has sentence, idx\)"),
        ([{"sentence": "fine", "label": 1}, {"sentence": "no label"}], r"train.jsonl line 2: field 'label' is missing"),
        ([{"sentence": "fine", "label": 1}, {"sentence": "bad", "label": 2}], r"train.jsonl line 2: field 'label' is 2; allowed: 0 \(negative\), 1 \(positive\)"),
        ([{"sentence": "unlabelled test row", "label": -1}], r"train.jsonl line 1: field 'label' is -1"),
        (["", "  "], r"train.jsonl: the file is empty \(task 'sst2' needs fields sentence, label\)"),
        (['{"sentence": "a", "label": 1}', '{"sentence": "b", '], r"train.jsonl line 2: not JSON \(.*\); a data file is JSON Lines"),
    ],
)
def test_bad_files_name_file_and_field(tmp_path, rows, message):
    write_jsonl(tmp_path / "d" / "sst2" / "train.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_split(cfg_for(tmp_path / "d", tmp_path).task, "train")


def test_bad_squad_answers(tmp_path):
    write_jsonl(tmp_path / "d" / "squad" / "train.jsonl", [SQUAD_ROW, {**SQUAD_ROW, "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(DataError, match=r"squad/train.jsonl line 2: field 'answers.text' must be a non-empty list"):
        load_split(cfg_for(tmp_path / "d", tmp_path, "task.name=squad").task, "train")


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize("task, splits", [("sst2", ("train", "validation")), ("squad", ("train", "validation")),
                                          ("xsum", ("train", "validation", "test"))])
def test_real_files_small_subsets(shared_data, tmp_path, task, splits):
    from lora_diffusion.model import load_base

    cfg = load_config(None, ["model.base=minilm", "model.max_length=256", f"task.name={task}", f"task.data_dir={shared_data}",
                             f"task.cache_dir={tmp_path / 'cache'}", "task.subset_size=40", "task.eval_subset_size=24", "task.seed=3"])
    _, tok = load_base(cfg.model)
    for split in splits:
        ds = make_dataset(cfg, tok, split)
        assert len(ds) == (40 if split == "train" else 24)
        rows = Path(ds.source).read_text().splitlines()
        i = 5
        assert json.loads(rows[ds[i]["index"]]) == {k: v for k, v in ds.example(i).items() if k in json.loads(rows[0])}
        batch = collator_for(cfg, tok)([ds[j] for j in range(8)])
        assert batch["input_ids"].shape[1] <= 256
        assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
        assert (batch["target_mask"].sum(1) == ds.task.target_budget).all()
    if task == "squad":
        assert ds.source.endswith("squad/dev_split/validation.jsonl")


def test_real_sst2_validation_counts(shared_data, tmp_path):
    cfg = load_config(None, [f"task.data_dir={shared_data}", f"task.cache_dir={tmp_path / 'cache'}"])
    ds = load_split(cfg.task, "validation")
    assert len(ds) == 872 and sum(ds["label"]) == 444


# --------------------------------------------------------------------------- collator


def _tok_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_collator_layout_and_masks(tiny_base):
    _, tok = tiny_base
    instr, ctx, tgt = _tok_ids(tok, "classify"), _tok_ids(tok, "a good film"), _tok_ids(tok, "positive")
    collate = Collator(tok, max_length=40, target_budget=4)
    batch = collate([{"instruction_ids": instr, "context_ids": ctx, "target_ids": tgt, "index": 7},
                     {"instruction_ids": instr, "context_ids": ctx[:1], "target_ids": tgt, "index": 2}])
    assert set(batch) == {"input_ids", "attention_mask", "target_mask", "instruction_mask", "index"}
    assert batch["input_ids"].dtype == torch.long and batch["target_mask"].dtype == torch.bool
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    row0 = [cls, *instr, sep, *ctx, sep, *tgt, sep, pad, pad]
    assert batch["input_ids"][0].tolist() == row0
    assert batch["attention_mask"][0].tolist() == [1] * len(row0)
    assert batch["target_mask"][0].tolist() == [False] * (len(row0) - 4) + [True] * 4
    assert batch["instruction_mask"][0].tolist() == [False] + [True] * len(instr) + [False] * (len(row0) - 1 - len(instr))
    # the shorter row is right-padded outside the target span
    n1 = len(row0) - len(ctx) + 1
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (len(row0) - n1)
    assert batch["target_mask"][1].sum() == 4 and not batch["target_mask"][1, n1:].any()
    assert batch["index"].tolist() == [7, 2]
    assert "index" not in collate([{"instruction_ids": instr, "context_ids": ctx, "target_ids": tgt}])


def test_collator_truncates_context_never_instruction_or_target(tiny_base):
    _, tok = tiny_base
    instr, tgt = _tok_ids(tok, "summarize the article"), _tok_ids(tok, "good")
    ctx = list(range(100, 160))
    collate = Collator(tok, max_length=30, target_budget=5)
    batch = collate([{"instruction_ids": instr, "context_ids": ctx, "target_ids": tgt}])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 30
    room = 30 - 3 - len(instr) - 5
    assert ids[1 : 1 + len(instr)] == instr
    assert ids[2 + len(instr) : 2 + len(instr) + room] == ctx[:room]  # the beginning of the context is kept
    assert ids[-5:] == [*tgt, tok.sep_token_id] + [tok.pad_token_id] * (4 - len(tgt))
    assert collate.contexts_cut == 1 and collate.targets_cut == 0


def test_collator_cuts_long_targets_with_a_counted_warning(tiny_base, caplog):
    _, tok = tiny_base
    collate = Collator(tok, max_length=30, target_budget=3)
    long_item = {"instruction_ids": [50], "context_ids": [60], "target_ids": [70, 71, 72, 73]}
    short_item = {"instruction_ids": [50], "context_ids": [60], "target_ids": [70]}
    with caplog.at_level(logging.WARNING, logger="lora_diffusion.collator"):
        batch = collate([long_item, short_item])
        collate([long_item])
    span = batch["input_ids"][0][batch["target_mask"][0]].tolist()
    assert span == [70, 71, tok.sep_token_id]  # cut to budget - 1, the closing [SEP] kept
    assert collate.targets_cut == 2 and collate.examples_seen == 3
    assert "1 of 2 targets so far were longer than the target budget of 3" in caplog.text
    assert "2 of 3 targets so far" in caplog.text


def test_collator_rejects_impossible_lengths(tiny_base):
    _, tok = tiny_base
    with pytest.raises(ValueError, match="model.max_length: got 6; must be >= target budget \\+ 3 = 7"):
        Collator(tok, max_length=6, target_budget=4)
    collate = Collator(tok, max_length=12, target_budget=4)
    with pytest.raises(ValueError, match=r"model.max_length=12: an instruction of 8 tokens .*need max_length >= 15"):
        collate([{"instruction_ids": list(range(50, 58)), "context_ids": [], "target_ids": [1]}])
