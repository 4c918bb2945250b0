"""Metrics: SQuAD EM/F1 against the official v1.1 rules, ROUGE/BLEU against the libraries,
label accuracy counting non-label outputs, and token-level denoising accuracy."""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter

import pytest
import torch
from torch import nn

from lora_diffusion import metrics as M


# The official SQuAD v1.1 evaluation functions (evaluate-v1.1.py), as published.
def _official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def _official_f1(prediction, ground_truth):
    prediction_tokens = _official_normalize_answer(prediction).split()
    ground_truth_tokens = _official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _official_em(prediction, ground_truth):
    return _official_normalize_answer(prediction) == _official_normalize_answer(ground_truth)


def test_squad_hand_cases():
    assert M.normalize_answer("  The Cat's   hat!") == "cats hat"
    assert M.normalize_answer("An apple, a day.") == "apple day"
    # exact match after normalisation; max over references
    assert M.squad_metrics(["the Denver Broncos"], [["Denver Broncos"]]) == {"exact_match": 100.0, "f1": 100.0}
    assert M.squad_metrics(["Broncos"], [["Denver Broncos", "Broncos"]])["exact_match"] == 100.0
    # "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1, F1 = 6/7
    out = M.squad_metrics(["the cat sat on the mat"], [["a cat on a mat"]])
    assert out["exact_match"] == 0.0
    assert out["f1"] == pytest.approx(100 * 6 / 7)
    # no overlap -> 0; averaged over examples
    out = M.squad_metrics(["Denver", "nothing here"], [["Denver Broncos"], ["Carolina Panthers"]])
    assert out["f1"] == pytest.approx(100 * (2 * 1 * 0.5 / 1.5) / 2)
    assert out["exact_match"] == 0.0
    # prediction normalising to nothing scores 0, not an error
    assert M.squad_metrics(["the"], [["Denver"]]) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_matches_official_functions_on_varied_strings():
    rng = random.Random(0)
    words = ["the", "a", "Denver", "Broncos", "won", "Super", "Bowl", "50,", "in", "2016.", "an", "Panthers'", "(NFL)"]
    for _ in range(300):
        pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
        refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        got = M.squad_metrics([pred], [refs])
        assert got["exact_match"] == pytest.approx(100 * max(float(_official_em(pred, r)) for r in refs))
        assert got["f1"] == pytest.approx(100 * max(_official_f1(pred, r) for r in refs))


def test_squad_matches_official_functions_on_real_answers(shared_data):
    rows = [json.loads(line) for line in (shared_data / "squad" / "validation.jsonl").open() if line.strip()][:400]
    preds = [r["answers"]["text"][-1] + (" extra" if i % 3 else "") for i, r in enumerate(rows)]
    refs = [r["answers"]["text"] for r in rows]
    got = M.squad_metrics(preds, refs)
    em = 100 * sum(max(float(_official_em(p, g)) for g in gs) for p, gs in zip(preds, refs)) / len(rows)
    f1 = 100 * sum(max(_official_f1(p, g) for g in gs) for p, gs in zip(preds, refs)) / len(rows)
    assert got["exact_match"] == pytest.approx(em)
    assert got["f1"] == pytest.approx(f1)
    assert 0 < got["exact_match"] < 100


def test_rouge_matches_rouge_score_library():
    from rouge_score import rouge_scorer

    preds = ["The cats were sitting on the mat. It was warm!", "police arrested a man", ""]
    refs = [["A cat sat on the mat.\nThe day was warm."], ["Police have arrested a man in Leeds."], ["Something."]]
    got = M.rouge_metrics(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    pred_lines = ["The cats were sitting on the mat.\nIt was warm!", "police arrested a man", ""]
    expect = {k: 0.0 for k in got}
    for p, r in zip(pred_lines, refs):
        s = scorer.score(r[0], p)
        for k in expect:
            expect[k] += 100 * s[k].fmeasure / len(preds)
    for k in expect:
        assert got[k] == pytest.approx(expect[k]), k
    # stemming: "cats"/"sitting" match "cat"/"sit"
    assert M.rouge_metrics(["cats sitting"], [["cat sit"]])["rouge1"] == pytest.approx(100.0)
    # rougeLsum sees the sentence split, rougeL does not
    assert got["rougeLsum"] != got["rougeL"]


def test_rouge_takes_best_reference():
    got = M.rouge_metrics(["a man was arrested"], [["completely unrelated words", "a man was arrested"]])
    assert got["rouge1"] == pytest.approx(100.0)


def test_split_sentences():
    assert M.split_sentences("One. Two!  Three? four") == "One.\nTwo!\nThree?\nfour"
    assert M.split_sentences("Line one\nLine two. More") == "Line one\nLine two.\nMore"


def test_bleu_matches_sacrebleu():
    import sacrebleu

    preds = ["the cat sat on the mat", "a quick brown fox jumps", "hello there"]
    refs = [["the cat is on the mat"], ["the quick brown fox jumped over"], ["hello there general"]]
    got = M.bleu_metric(preds, refs)["bleu"]
    assert got == pytest.approx(sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score)
    # uneven reference counts: a repeated first reference changes nothing
    two = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox jumped over"], ["hello there general"]]
    expect = sacrebleu.corpus_bleu(preds, [[r[0] for r in two], [r[-1] for r in two]]).score
    assert M.bleu_metric(preds, two)["bleu"] == pytest.approx(expect)
    assert M.bleu_metric(["exactly this sentence here"], [["exactly this sentence here"]])["bleu"] == pytest.approx(100.0)


def test_accuracy_counts_non_label_outputs_as_wrong():
    preds = ["positive", " Negative. ", "neutral", "", "positive positive", "negative"]
    refs = [["positive"], ["negative"], ["positive"], ["negative"], ["positive"], ["positive"]]
    got = M.classification_metrics(preds, refs, ("negative", "positive"))
    assert got["accuracy"] == pytest.approx(100 * 2 / 6)
    assert got["non_label_count"] == 3.0
    assert got["non_label_rate"] == pytest.approx(50.0)


class _Fixed(nn.Module):
    """Predicts `answer[token position]` for every masked position (an oracle or a liar)."""

    def __init__(self, answer: torch.Tensor, vocab: int):
        super().__init__()
        self.answer, self.vocab = answer, vocab
        self.seen_t: list[float] = []

    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        self.seen_t.extend(t.tolist())
        return nn.functional.one_hot(self.answer[positions], self.vocab).float() * 10


def _batch():
    ids = torch.tensor([[2, 10, 3, 11, 3, 20, 21, 3, 0], [2, 10, 3, 12, 3, 22, 3, 0, 0]])
    target = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1, 0]]).bool()
    return {"input_ids": ids, "attention_mask": (ids != 0).long() | target.long(), "target_mask": target,
            "instruction_mask": torch.zeros_like(target).index_fill(1, torch.tensor([1]), True)}


def test_denoising_accuracy_oracle_liar_and_half():
    batch = _batch()
    oracle = _Fixed(batch["input_ids"], 30)
    got = M.denoising_accuracy(oracle, [batch], [0.25, 0.5, 1.0], mask_id=4)
    assert got == {"denoise_acc": 100.0, "denoise_acc_t25": 100.0, "denoise_acc_t50": 100.0, "denoise_acc_t100": 100.0}
    assert set(oracle.seen_t) == {0.25, 0.5, 1.0}
    liar = _Fixed((batch["input_ids"] + 1) % 30, 30)
    assert M.denoising_accuracy(liar, [batch], [0.5], mask_id=4)["denoise_acc"] == 0.0
    # right on the first row only: at t = 1 every target position is masked (4 + 3), 4 of them right
    half = batch["input_ids"].clone()
    half[1] = (half[1] + 1) % 30
    assert M.denoising_accuracy(_Fixed(half, 30), [batch], [1.0], mask_id=4)["denoise_acc"] == pytest.approx(100 * 4 / 7)


def test_denoising_accuracy_is_reproducible():
    batch = _batch()
    noisy = batch["input_ids"].clone()
    noisy[:, 5] = 1  # wrong at one position per row: the score depends on which positions get masked
    a = M.denoising_accuracy(_Fixed(noisy, 30), [batch, batch], [0.5], mask_id=4, seed=3)
    b = M.denoising_accuracy(_Fixed(noisy, 30), [batch, batch], [0.5], mask_id=4, seed=3)
    assert a == b


def test_content_token_denoising_accuracy_excludes_sep_and_pad():
    batch = _batch()  # row 0 span: 20 21 [SEP]=3 [PAD]=0; row 1 span: 22 [SEP] [PAD]
    ids = batch["input_ids"]
    only_markers = torch.where((ids == 3) | (ids == 0), ids, (ids + 1) % 30)  # right on [SEP]/[PAD] only
    got = M.denoising_accuracy(_Fixed(only_markers, 30), [batch], [1.0], mask_id=4, exclude_ids=(3, 0))
    assert got["denoise_acc"] == pytest.approx(100 * 4 / 7)  # the paper's metric: 4 of 7 span tokens "right"
    assert got["denoise_acc_content"] == 0.0  # none of the answers' own tokens
    oracle = M.denoising_accuracy(_Fixed(ids, 30), [batch], [1.0], mask_id=4, exclude_ids=(3, 0))
    assert oracle["denoise_acc_content"] == 100.0
    assert "denoise_acc_content" not in M.denoising_accuracy(_Fixed(ids, 30), [batch], [1.0], mask_id=4)


class _Logits(nn.Module):
    """Fixed random logits per (row, position); records what it was called with."""

    def __init__(self, B: int, L: int, vocab: int, seed: int = 0):
        super().__init__()
        self.table = torch.randn(B, L, vocab, generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        self.calls.append((x_t.clone(), t.clone(), positions.clone()))
        return self.table[positions]


def test_rank_classification_equals_hand_computed_log_likelihoods():
    from lora_diffusion.scoring import rank_classify, rank_scores

    batch = _batch()
    fake = _Logits(2, 9, 30)
    candidates = [[20, 3], [22, 25, 3]]  # a one-token and a two-token label word, each closed by [SEP] = 3
    scores = rank_scores(fake, batch, candidates, mask_id=4)
    logp = torch.log_softmax(fake.table, dim=-1)
    want = torch.zeros(2, 2)
    for b, start in enumerate((5, 5)):  # both spans start at position 5
        span_len = int(batch["target_mask"][b].sum())
        for j, cand in enumerate(candidates):
            want[b, j] = sum(float(logp[b, start + k, tok]) for k, tok in enumerate(cand[:span_len]))
    torch.testing.assert_close(scores, want)
    assert rank_classify(fake, batch, candidates, mask_id=4).tolist() == want.argmax(-1).tolist()
    x_t, t, positions = fake.calls[0]
    assert (x_t[batch["target_mask"]] == 4).all() and torch.equal(t, torch.ones(2))  # whole span masked, t = 1
    assert torch.equal(positions, batch["target_mask"])
