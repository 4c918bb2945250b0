"""Task data: load a split (Hub or local JSON Lines), check it, pick a subset, tokenise (cached).

    ds = load_split(cfg.task, "validation")          # datasets.Dataset in the Hub schema, checked
    train = make_dataset(cfg, tokenizer, "train")    # torch Dataset of tokenised examples
    loader = DataLoader(train, batch_size=16, collate_fn=collator_for(cfg, tokenizer))

Where the data comes from:
- `task.data_dir` (or env LORA_DIFFUSION_DATA_DIR) set: `<data_dir>/<task>/<split>.jsonl`, one JSON
  object per line in the Hugging Face schema of the task (a task may map a split to another file:
  see tasks/squad.py). A split may also be given as a relative file stem such as
  "dev_split/validation".
- otherwise the Hugging Face Hub (glue/sst2, rajpurkar/squad, EdinburghNLP/xsum); offline this
  fails with a message that names `task.data_dir` as the way out.

Every example is checked (required fields, types, labels in the task's set) before anything is
tokenised: a bad file fails at once, naming the file, the line and the field.

Subsets: `task.subset_size` (the training split) and `task.eval_subset_size` (any other split)
draw that many examples without replacement with `task.seed`; the same seed gives the same rows.
The `index` of an example is its row number in the split's file.

Tokenisation is a `datasets.map` whose cache fingerprint is keyed by the source data, the subset,
the tokenizer (its full serialisation), the task's templates and the lengths, so a second run
with the same settings loads the cached Arrow file instead of tokenising again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_diffusion.tasks import get_task
from lora_diffusion.tasks.base import DataError, Task

log = logging.getLogger(__name__)

TOKENIZATION_VERSION = 1  # bump when the tokenised columns change meaning
TOKEN_COLUMNS = ("instruction_ids", "context_ids", "target_ids")

# --------------------------------------------------------------------------- loading a split


def _data_dir_source(task_cfg) -> str:
    return "task.data_dir" if task_cfg.data_dir else "LORA_DIFFUSION_DATA_DIR"


SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


def check_split_name(split: str) -> None:
    """A split is a file stem inside the task's folder: names of letters, digits, '.', '_', '-' joined by '/'."""
    if not isinstance(split, str) or not SPLIT_RE.match(split) or any(part == ".." for part in split.split("/")):
        raise DataError(f"split {split!r}: not allowed; a split is a file stem inside <data_dir>/<task>/ such as "
                        "'validation' or 'dev_split/validation' (letters, digits, '.', '_', '-' and '/'; no '..', "
                        "no leading '/')")


def local_split_file(task: Task, data_dir: str, split: str, source: str = "task.data_dir") -> Path:
    """The JSON Lines file of `split` under `data_dir`, or a DataError saying what is there."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{source}={data_dir!r}: folder does not exist")
    folder = root / task.name
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"{source}={data_dir!r}: no folder {task.name!r} in it (expected {task.name}/<split>.jsonl; "
            f"folders present: {', '.join(present) or 'none'})"
        )
    check_split_name(split)
    path = task.local_path(root, split)
    if path is None and "/" in split and (folder / f"{split}.jsonl").is_file():
        path = folder / f"{split}.jsonl"
    if path is not None and not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"split {split!r}: {path} resolves to {path.resolve()}, outside the task folder {folder}; "
                        "a split must name a file inside it")
    if path is None:
        present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jsonl"))
        wanted = " or ".join(str(folder / c) for c in task.local_candidates(split))
        raise DataError(
            f"task {task.name!r} split {split!r}: file {wanted} does not exist "
            f"(files present: {', '.join(present) or 'none'})"
        )
    return path


def scan_jsonl(path: Path) -> list[int]:
    """The 1-based line numbers of the non-blank lines of a JSON Lines file, after checking that each is
    UTF-8 text holding one JSON object; a DataError names the file, the line and what is wrong."""
    lines = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "a data file is JSON Lines in UTF-8, one JSON object per line") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not JSON ({e.msg} at column {e.colno}); "
                                "a data file is JSON Lines, one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {lineno}: a JSON {type(row).__name__}, not an object; "
                                "a data file is JSON Lines, one JSON object per line")
            lines.append(lineno)
    return lines


@contextlib.contextmanager
def _no_leftovers_on_failure(cache_dir: str | None):
    """A failed `datasets.load_dataset` leaves lock files and empty folders in the datasets cache: remove
    those it made (free lock files, empty folders; never another process's data or a held lock)."""
    import datasets

    root = Path(cache_dir).expanduser() if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    before = set(_walk(root))
    try:
        yield
    except BaseException:
        for p in sorted(set(_walk(root)) - before, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                if p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
                elif p.is_file() and p.name.endswith(".lock") and _lock_is_free(p):
                    p.unlink()
        if not before and root.is_dir() and not any(root.iterdir()):
            with contextlib.suppress(OSError):
                root.rmdir()
        raise


def _walk(root: Path):
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            yield Path(folder) / name


def _lock_is_free(path: Path) -> bool:
    import fcntl

    try:
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return True
    except OSError:
        return False


def _load_local(task: Task, path: Path, cache_dir: str | None):
    """(dataset, the file's line number of each row)."""
    import datasets

    lines = scan_jsonl(path)
    if not lines:
        raise DataError(f"{path}: the file is empty (task {task.name!r} needs fields {', '.join(task.required_fields)})")
    try:
        with _no_leftovers_on_failure(cache_dir):
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many types; say which file
        cause = e.__cause__ or e
        raise DataError(f"{path}: not valid JSON Lines ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
    return ds, (lines if len(lines) == len(ds) else None)


def _load_hub(task: Task, split: str, cache_dir: str | None):
    import datasets

    hub_split = task.hub_splits.get(split, split)
    name = task.hub_id + (f"/{task.hub_config}" if task.hub_config else "")
    try:
        with _no_leftovers_on_failure(cache_dir):
            return datasets.load_dataset(task.hub_id, task.hub_config, split=hub_split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - offline, missing split, auth: one clear message
        raise DataError(
            f"task {task.name!r}: could not load split {hub_split!r} of {name} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without network, set task.data_dir "
            f"(or env LORA_DIFFUSION_DATA_DIR) to a folder holding {task.name}/{split}.jsonl in the Hub schema."
        ) from None


def check_split(task: Task, ds, where: str, lines: list[int] | None = None) -> None:
    """Raise a DataError naming `where`, the line (`lines[row]` of a file, else row + 1) and the field for
    the first unusable example."""
    if len(ds) == 0:
        raise DataError(f"{where}: the split is empty")
    missing = [f for f in task.required_fields if f not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: field {missing[0]!r} missing (task {task.name!r} needs {', '.join(task.required_fields)}; "
            f"the file has {', '.join(ds.column_names)})"
        )
    cols = ds.select_columns(list(task.required_fields))
    row = 0
    for batch in cols.iter(batch_size=4096):
        n = len(batch[task.required_fields[0]])
        for i in range(n):
            problem = task.check_example({f: batch[f][i] for f in task.required_fields})
            if problem:
                raise DataError(f"{where} line {lines[row + i] if lines else row + i + 1}: {problem}")
        row += n


def load_split(task_cfg, split: str):
    """The checked `datasets.Dataset` of one split of `task_cfg.name` (Hub schema)."""
    return _load_checked(task_cfg, split)[0]


def _load_checked(task_cfg, split: str):
    """(dataset, where it came from: the file path or the Hub id and split, the file's line of each row or None)."""
    task = get_task(task_cfg.name)
    data_dir = task_cfg.resolved_data_dir()
    lines = None
    if data_dir:
        path = local_split_file(task, data_dir, split, _data_dir_source(task_cfg))
        ds, lines = _load_local(task, path, task_cfg.cache_dir)
        where = str(path)
    else:
        ds = _load_hub(task, split, task_cfg.cache_dir)
        where = f"{task.hub_id} {task.hub_config or ''} split {split!r}".replace("  ", " ")
    check_split(task, ds, where, lines)
    return ds, where, lines


# --------------------------------------------------------------------------- tokenising

_TOKENIZER_HASHES: dict[int, str] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer splits text (vocabulary, normaliser, ...)."""
    key = id(tokenizer)
    if key not in _TOKENIZER_HASHES:
        h = hashlib.sha256(type(tokenizer).__name__.encode())
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
            h.update(str(getattr(tokenizer, "do_lower_case", None)).encode())
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
            h.update(str(getattr(tokenizer, name, None)).encode())
        _TOKENIZER_HASHES[key] = h.hexdigest()[:16]
    return _TOKENIZER_HASHES[key]


def target_budget(cfg) -> int:
    """The target span length for `cfg` (task.target_budget, else the task's default)."""
    return cfg.task.target_budget or get_task(cfg.task.name).target_budget


def subset_size_for(cfg, split: str) -> int | None:
    return cfg.task.subset_size if split == cfg.task.train_split else cfg.task.eval_subset_size


def subset_indices(n_rows: int, size: int | None, seed: int) -> list[int] | None:
    """Sorted row indices of a reproducible random subset, or None for all rows."""
    if size is None or size >= n_rows:
        return None
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_rows, size=size, replace=False))


class TaskDataset(torch.utils.data.Dataset):
    """Tokenised examples of one split; items are what `Collator` takes.

    item: {"instruction_ids", "context_ids", "target_ids": list[int], "index": int}
    `example(i)` is the raw example (Hub schema), `references(i)` its scoring references.
    """

    def __init__(self, task: Task, examples, split: str, source: str):
        self.task = task
        self.examples = examples  # datasets.Dataset: raw fields + token columns + index
        self.split = split
        self.source = source
        self._tokens = examples.select_columns([*TOKEN_COLUMNS, "index"])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._tokens[int(i)]

    def example(self, i: int) -> dict[str, Any]:
        return self.examples[int(i)]

    def references(self, i: int) -> list[str]:
        return self.task.references(self.examples[int(i)])


def _tokenize_fn(task: Task, tokenizer, max_length: int):
    def fn(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        instr, ctx, tgt = zip(*(task.to_prompt_target(r) for r in rows))
        enc = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
        instruction_ids, context_ids, target_ids = enc(instr), enc(ctx), enc(tgt)
        context_ids = [c[:max_length] for c in context_ids]  # never more than a whole sequence is usable
        return {
            "instruction_ids": instruction_ids,
            "context_ids": context_ids,
            "target_ids": target_ids,
            "n_instruction": [len(x) for x in instruction_ids],
            "n_target": [len(x) for x in target_ids],
        }

    return fn


def make_dataset(cfg, tokenizer, split: str) -> TaskDataset:
    """Load, check, subset and tokenise one split of `cfg.task` for `tokenizer` (cached)."""
    task = get_task(cfg.task.name)
    ds, source, lines = _load_checked(cfg.task, split)
    budget = target_budget(cfg)
    max_length = cfg.model.max_length

    ds = ds.add_column("index", list(range(len(ds))))
    idx = subset_indices(len(ds), subset_size_for(cfg, split), cfg.task.seed)
    if idx is not None:
        ds = ds.select(idx)

    key = json.dumps({
        "v": TOKENIZATION_VERSION, "data": ds._fingerprint, "task": task.name,
        "instruction": task.instruction_template, "input": task.input_field, "target": type(task).references.__qualname__,
        "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
    }, sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "longer than the model's maximum": the collator cuts the context
    try:
        ds = ds.map(
            _tokenize_fn(task, tokenizer, max_length), batched=True, batch_size=1000, new_fingerprint=fingerprint,
            desc=f"tokenising {task.name}/{split}",
        )
    finally:
        hf_logging.set_verbosity(verbosity)

    # Fail before any training when the never-cut parts cannot fit; count targets that will be cut.
    n_instr = ds["n_instruction"]
    worst = int(np.argmax(n_instr))
    need = n_instr[worst] + budget + 3  # [CLS] instruction [SEP] [SEP] target-span (context may shrink to 0)
    if need > max_length:
        raise DataError(
            f"model.max_length={max_length} is too small for {source} "
            f"{'line ' + str(lines[ds[worst]['index']]) if lines else 'row ' + str(ds[worst]['index'] + 1)}: its instruction "
            f"has {n_instr[worst]} tokens and the target span {budget} (task.target_budget); need max_length >= {need}"
        )
    n_cut = sum(1 for n in ds["n_target"] if n > budget - 1)
    if n_cut:
        log.warning("%s: %d of %d targets are longer than the target budget (%d tokens incl. [SEP]) and will be cut; "
                    "raise task.target_budget to keep them whole", source, n_cut, len(ds), budget)
    return TaskDataset(task, ds, split, source)


def collator_for(cfg, tokenizer):
    """The `Collator` matching `cfg` (model.max_length, the task's target budget)."""
    from lora_diffusion.collator import Collator

    return Collator(tokenizer, cfg.model.max_length, target_budget(cfg))
