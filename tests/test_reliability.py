"""Bad input as a new user gives it, to every command: exit code 2, a message naming the key / file / value
and what is allowed, no Python traceback, nothing left behind, no cluster time spent.

Most cases call the command's `main()` in this process (an uncaught exception, i.e. a traceback, fails the
test; so does starting Ray: `ray.init` is replaced by a function that fails). A few run the real command
in a subprocess to see its whole stderr. No timing is asserted (CI's machine is shared); the store checks
are shown to skip MLflow's retries instead ("will be retried" never appears), and the README gives the
measured times.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from test_tune import TINY, no_ray, write_space, write_sst2  # noqa: F401 - no_ray is a fixture

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A real tiny adapter folder (builtin:tiny base, lora_diffusion method)."""
    from lora_diffusion.adapter import save_adapter
    from lora_diffusion.config import load_config
    from lora_diffusion.methods import build_method
    from lora_diffusion.model import load_base

    cfg = load_config(None, ["model.base=builtin:tiny", "model.max_length=32", "task.name=sst2"])
    denoiser, _ = load_base(cfg.model)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(build_method(cfg.method, denoiser), folder, cfg.model, cfg.method, extra={"task": "sst2"})
    return folder


def broken_copy(adapter: Path, where: Path, *, truncate: bool = False, junk_config: bool = False) -> Path:
    from lora_diffusion.adapter import CONFIG_NAME, WEIGHTS_NAME

    where.mkdir(parents=True)
    (where / CONFIG_NAME).write_text("{not json" if junk_config else (adapter / CONFIG_NAME).read_text())
    weights = (adapter / WEIGHTS_NAME).read_bytes()
    (where / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2] if truncate else weights)
    return where


def pickle_only_base(where: Path) -> Path:
    """A Hugging Face folder whose weights are only a pickle (pytorch_model.bin), never to be unpickled."""
    where.mkdir(parents=True)
    (where / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 100, "hidden_size": 16,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                                   "intermediate_size": 32}))
    (where / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return where


def expect_refused(capsys, rc, *parts: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    for p in parts:
        assert p in err, (p, err)
    assert "Traceback" not in err and "will be retried" not in err, err
    return err


# --------------------------------------------------------------------------- evaluate / generate


@pytest.mark.parametrize("split", ["../../x", "../sst2/train", "/etc/passwd", "a/../../b", ".hidden"])
def test_evaluate_refuses_a_split_that_escapes_the_data_folder(split, data, capsys, no_ray):
    from lora_diffusion.evaluate import main

    rc = main(["--base", "builtin:tiny", "--task", "sst2", "--data-dir", str(data), "--split", split])
    expect_refused(capsys, rc, f"split {split!r}: not allowed", "inside <data_dir>/<task>/")


def test_a_symlinked_split_file_outside_the_task_folder_is_refused(data, tmp_path, capsys):
    from lora_diffusion.data import local_split_file
    from lora_diffusion.tasks import DataError, get_task

    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"sentence": "x", "label": 1}\n')
    link = data / "sst2" / "leak.jsonl"
    link.symlink_to(outside)
    try:
        with pytest.raises(DataError, match="outside the task folder"):
            local_split_file(get_task("sst2"), str(data), "leak")
    finally:
        link.unlink()


@pytest.mark.parametrize("case, args, parts", [
    ("truncated weights", ["--adapter", "{truncated}"], ["adapter_model.safetensors is not a readable safetensors file",
                                                          "truncated or corrupt"]),
    ("config not JSON", ["--adapter", "{junk}"], ["adapter_config.json is not JSON"]),
    ("pickle-only base", ["--base", "{pickle}"], ["holds only pickle weights (pytorch_model.bin)", "never unpickles"]),
    ("batch size 0", ["--base", "builtin:tiny", "--batch-size", "0"], ["--batch-size: got 0; must be > 0"]),
    ("out is a file", ["--base", "builtin:tiny", "--out", "{file}"], ["--out:", "is a file"]),
])
def test_evaluate_bad_inputs(case, args, parts, adapter, data, tmp_path, capsys):
    from lora_diffusion.evaluate import main

    subs = {"{truncated}": str(broken_copy(adapter, tmp_path / "t", truncate=True)),
            "{junk}": str(broken_copy(adapter, tmp_path / "j", junk_config=True)),
            "{pickle}": str(pickle_only_base(tmp_path / "pickle_base")), "{file}": str(tmp_path / "f.txt")}
    (tmp_path / "f.txt").write_text("x")
    argv = [subs.get(a, a) for a in args] + ["--task", "sst2", "--data-dir", str(data), "--limit", "2"]
    expect_refused(capsys, main(argv), *parts)


def test_generate_refuses_a_truncated_adapter_and_a_pickle_base(adapter, tmp_path, capsys):
    from lora_diffusion.generate import main

    bad = broken_copy(adapter, tmp_path / "t", truncate=True)
    expect_refused(capsys, main(["--adapter", str(bad), "--prompt", "good film"]), "is not a readable safetensors file")
    base = pickle_only_base(tmp_path / "pb")
    expect_refused(capsys, main(["--base", str(base), "--task", "sst2", "--prompt", "good film"]), "never unpickles")


# --------------------------------------------------------------------------- train


def train_args(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["model.base=builtin:tiny", "model.max_length=32", f"task.data_dir={data}", "train.max_steps=2",
            "train.warmup_steps=0", f"train.output_dir={tmp_path / 'out'}", *extra]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/abs", ".hidden", "x" * 200, "semi;colon"])
def test_train_refuses_a_run_name_that_is_not_a_plain_folder_name(name, data, tmp_path, capsys, no_ray, monkeypatch):
    from lora_diffusion.train import main

    monkeypatch.chdir(tmp_path)
    rc = main(train_args(data, tmp_path, f"tracking.run_name={name}"))
    expect_refused(capsys, rc, f"tracking.run_name: got {name!r}", "no '/', no '..'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("store, parts", [
    ("folder", ["is a folder, not a SQLite file", "sqlite:///<folder>/mlflow.db"]),
    ("not_sqlite", ["cannot be used as a SQLite store (file is not a database)"]),
    ("read_only_place", ["cannot create the SQLite file '/proc/mlflow.db' in '/proc'"]),
    ("closed_http", ["is not reachable (ConnectionError)"]),
])
def test_train_refuses_a_tracking_store_it_cannot_use_quickly_and_creates_none(store, parts, data, tmp_path, capsys,
                                                                               no_ray, monkeypatch):
    from lora_diffusion.train import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    uri = {"folder": f"sqlite:///{tmp_path / 'folder.db'}", "not_sqlite": f"sqlite:///{tmp_path / 'junk.db'}",
           "read_only_place": "sqlite:////proc/mlflow.db", "closed_http": f"http://127.0.0.1:{closed_port()}"}[store]
    rc = main(train_args(data, tmp_path, "tracking.enabled=true", f"tracking.tracking_uri={uri}"))
    expect_refused(capsys, rc, *parts)
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_new_sqlite_store_is_not_created_by_the_check(tmp_path):
    from lora_diffusion.tracking import check_tracking_uri

    check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert list(tmp_path.iterdir()) == []  # the probe file is gone too


def test_train_refuses_a_corrupt_checkpoint_to_resume_from(data, tmp_path, capsys, no_ray):
    from lora_diffusion.checkpoint import FORMAT
    from lora_diffusion.train import main

    ckpt = tmp_path / "checkpoint_0000002"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"format": FORMAT}))
    (ckpt / "train_state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    rc = main(train_args(data, tmp_path, "--resume-from", str(ckpt)))
    expect_refused(capsys, rc, "train_state.safetensors is not a readable safetensors file", "truncated or corrupt")


def test_data_errors_name_the_1_based_line_and_leave_no_cache_behind(tmp_path, capsys, no_ray):
    from lora_diffusion.train import main

    root = tmp_path / "d"
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "train.jsonl").write_bytes(b'{"sentence": "fine", "label": 1}\n\n{"sentence": "caf\xe9", "label": 0}\n')
    cache = tmp_path / "cache"
    rc = main(train_args(root, tmp_path, f"task.cache_dir={cache}"))
    expect_refused(capsys, rc, "train.jsonl line 3: not UTF-8 text (byte 0xe9 at column 18)")
    (root / "sst2" / "train.jsonl").write_text('{"sentence": "fine", "label": 1}\n\n{"sentence": "no label"}\n')
    (root / "sst2" / "validation.jsonl").write_text('{"sentence": "fine", "label": 1}\n')
    rc = main(train_args(root, tmp_path, f"task.cache_dir={cache}"))
    expect_refused(capsys, rc, "train.jsonl line 3: field 'label' is missing")  # line 3 of the file, not row 2


def test_a_failed_hub_load_leaves_no_lock_files_or_empty_folders(tmp_path, monkeypatch):
    from lora_diffusion.config import load_config
    from lora_diffusion.data import load_split
    from lora_diffusion.tasks import DataError

    monkeypatch.delenv("LORA_DIFFUSION_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kept.txt").write_text("someone else's")
    cfg = load_config(None, ["task.name=sst2", f"task.cache_dir={cache}"])
    with pytest.raises(DataError, match="could not load split"):
        load_split(cfg.task, "train")
    assert sorted(p.name for p in cache.rglob("*")) == ["kept.txt"]


# --------------------------------------------------------------------------- secrets


def test_a_password_in_the_tracking_uri_is_never_logged_or_printed(tmp_path, capsys):
    from lora_diffusion.tracking import RunTracker, TrackingError, check_tracking_uri, error_text

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    secret_uri = "https://alice:s3cr3t@mlflow.example.org"
    run = RunTracker.start(uri, "secrets")
    run.log_params({"tracking.tracking_uri": secret_uri, "other": "https://tok3n@host/x"})
    run.set_tags({"note": f"store {secret_uri}"})
    run.end("FAILED", error=error_text(RuntimeError(f"cannot reach {secret_uri}")))
    data = run.client.get_run(run.run_id).data
    text = json.dumps({"params": data.params, "tags": data.tags})
    assert "s3cr3t" not in text and "tok3n" not in text, text
    assert data.params["tracking.tracking_uri"] == "https://alice:***@mlflow.example.org"
    with pytest.raises(TrackingError) as e:
        check_tracking_uri(f"http://alice:s3cr3t@127.0.0.1:{closed_port()}")
    assert "s3cr3t" not in str(e.value) and "alice:***@" in str(e.value)


# --------------------------------------------------------------------------- tune


def test_tune_refuses_bad_counts_before_anything(tmp_path, capsys, no_ray, monkeypatch):
    from lora_diffusion import tune

    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    for flag, value in (("--samples", "-1"), ("--samples", "0"), ("--num-samples", "0"), ("--num-cpus", "0")):
        with pytest.raises(SystemExit) as e:
            tune.main([str(space), "--dry-run", flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag}: got {value}; must be >= 1" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [space]


@pytest.mark.parametrize("where, parts", [
    ("a_file", ["--storage-path:", "is a file, not a folder"]),
    ("/proc/tune_results", ["--storage-path: '/proc/tune_results' is not writable"]),
    ("under_a_file", ["cannot be created:", "is a file"]),
])
def test_tune_checks_the_storage_path_before_ray_and_mlflow(where, parts, data, tmp_path, capsys, no_ray, monkeypatch):
    from lora_diffusion import tune

    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    (tmp_path / "a_file").write_text("x")
    storage = {"a_file": str(tmp_path / "a_file"), "under_a_file": str(tmp_path / "a_file" / "sub")}.get(where, where)
    rc = tune.main([str(space), "--data-dir", str(data), "--storage-path", storage,
                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    expect_refused(capsys, rc, *parts)
    assert not (tmp_path / "mlflow.db").exists()  # no store, so no FAILED run either


def test_tune_dry_run_runs_the_real_checks(tmp_path, capsys, no_ray, monkeypatch):
    from lora_diffusion import tune

    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    expect_refused(capsys, tune.main([str(space), "--dry-run", "--data-dir", str(tmp_path / "nowhere")]),
                   "folder does not exist")
    write_sst2(tmp_path / "d")
    (tmp_path / "folder.db").mkdir()
    expect_refused(capsys, tune.main([str(space), "--dry-run", "--data-dir", str(tmp_path / "d"),
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'folder.db'}"]), "is a folder")
    assert tune.main([str(space), "--dry-run", "--data-dir", str(tmp_path / "d")]) == 0
    assert "checked as a real run checks before it starts Ray: data files, base model(s), MLflow store" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "folder.db", "space.yaml"]


@pytest.mark.parametrize("problem, parts", [
    ("group_writable", ["is writable by its group (mode drwxrwxr-x)", "chmod -R go-w"]),
    ("world_writable_pickle", ["tuner.pkl is writable by others", "refused"]),
    ("other_owner", ["belongs to user id 65534, not to you", "Copy the sweep into a folder of yours"]),
])
def test_tune_refuses_to_restore_a_sweep_others_could_have_written(problem, parts, data, tmp_path, capsys, no_ray,
                                                                    monkeypatch):
    from lora_diffusion import tune
    from lora_diffusion.sweep.resume import SWEEP_FILE

    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    storage = tmp_path / "st"
    exp = storage / "tiny"
    exp.mkdir(parents=True, mode=0o755)
    os.chmod(storage, 0o755)
    os.chmod(exp, 0o755)
    (exp / SWEEP_FILE).write_text("{}")
    (exp / "tuner.pkl").write_bytes(b"planted")
    os.chmod(exp / "tuner.pkl", 0o644)
    if problem == "group_writable":
        os.chmod(exp, 0o775)
    elif problem == "world_writable_pickle":
        os.chmod(exp / "tuner.pkl", 0o646)
    else:
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(exp / "tuner.pkl", 65534, 65534)
    rc = tune.main([str(space), "--resume", "--data-dir", str(data), "--storage-path", str(storage),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    expect_refused(capsys, rc, "--resume:", *parts)


@pytest.mark.parametrize("param, parts", [
    ("train.weight_decay: {type: float, low: 0.0, high: 0.1, when: {train.batch_size: 999}}",
     ["when.train.batch_size: [999] can never hold", "the base config fixes it to"]),
    ("train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n"
     "  train.weight_decay: {type: float, low: 0.0, high: 0.1, when: {train.lr: 0.001}}",
     ["when.train.lr: [0.001] can never hold", "probability 0"]),
    ("train.batch_size: {type: int, low: 4, high: 16, step: 4}\n"
     "  train.weight_decay: {type: float, low: 0.0, high: 0.1, when: {train.batch_size: [6, 32]}}",
     ["[6, 32] can never hold", "integers 4..16 in steps of 4"]),
])
def test_a_when_condition_that_can_never_hold_is_refused(param, parts, tmp_path, capsys, no_ray, monkeypatch):
    from lora_diffusion import tune

    monkeypatch.chdir(tmp_path)
    body = TINY.replace("  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}", "  " + param)
    expect_refused(capsys, tune.main([str(write_space(tmp_path, body)), "--dry-run"]), *parts)


# --------------------------------------------------------------------------- pretrain


def test_pretrain_refuses_binary_and_non_utf8_files(tmp_path, capsys):
    from lora_diffusion.pretrain import main

    binary = tmp_path / "corpus.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    args = ["--base", "builtin:tiny", "--steps", "1", "--out", str(tmp_path / "out")]
    expect_refused(capsys, main([*args, "--text-file", str(binary)]), f"--text-file {str(binary)!r}: line 2 is not UTF-8 text (byte 0x80")  # line 1 ends at byte 0x0a
    write_sst2(tmp_path / "d")
    with open(tmp_path / "d" / "sst2" / "train.jsonl", "ab") as f:
        f.write(b'{"sentence": "\xff\xfe", "label": 1}\n')
    expect_refused(capsys, main([*args, "--data-dir", str(tmp_path / "d"), "--tasks", "sst2"]),
                   "train.jsonl: line 65 is not UTF-8")
    expect_refused(capsys, main([*args, "--text-file", str(binary), "--warmup", "-1"]), "--warmup: got -1")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the real commands, whole stderr


def run_cmd(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", f"lora_diffusion.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_commands_in_a_fresh_process_end_with_a_message_not_a_traceback(data, adapter, tmp_path):
    port = closed_port()
    (tmp_path / "folder.db").mkdir()
    trunc = broken_copy(adapter, tmp_path / "trunc", truncate=True)
    cases = [
        (("report", "--experiment", "x", "--tracking-uri", f"http://u:pw@127.0.0.1:{port}"), "is not reachable"),
        (("report", "--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'folder.db'}"), "is a folder"),
        (("evaluate", "--adapter", str(trunc), "--data-dir", str(data), "--split", "../../etc/passwd"), "not allowed"),
        (("generate", "--adapter", str(trunc), "--prompt", "fine"), "not a readable safetensors file"),
    ]
    for args, part in cases:
        out = run_cmd(*args, cwd=tmp_path)
        assert out.returncode == 2 and part in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and "pw@" not in out.stderr + out.stdout, (args, out.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.db", "trunc"]


def test_a_binary_config_or_space_file_is_named(tmp_path, capsys, no_ray):
    from lora_diffusion import train, tune

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00binary")
    expect_refused(capsys, train.main(["--config", str(binary)]), f"config file {str(binary)!r} is not UTF-8 text")
    expect_refused(capsys, tune.main([str(binary), "--dry-run"]), f"space file {str(binary)!r} is not UTF-8 text")


def test_a_systemexit_from_rays_sigterm_handler_in_a_gc_callback_is_not_printed():
    """Item 10's cause: Ray's SIGTERM handler raising SystemExit inside a weakref callback (WeakSet._remove at
    shutdown) is reported by Python as 'Exception ignored ... Traceback'. The hook drops that one report only."""
    import weakref

    from lora_diffusion.ray_runtime import quiet_ray_sigterm_exit

    saved = sys.unraisablehook
    reported = []
    sys.unraisablehook = reported.append  # stands for Python's default report (pytest has its own)
    try:
        quiet_ray_sigterm_exit()
        ns: dict = {}
        exec(compile("def sigterm_handler(signum=15, frame=None):\n    raise SystemExit(signum)\n",
                     os.sep.join(["", "venv", "ray", "_private", "worker.py"]), "exec"), ns)

        class Obj:
            pass

        a = Obj()
        ref_a = weakref.ref(a, lambda _: ns["sigterm_handler"]())  # noqa: F841 - kept until `a` goes
        del a
        assert reported == []

        def other(_):
            raise SystemExit(3)

        b = Obj()
        ref_b = weakref.ref(b, other)  # noqa: F841
        del b
        assert [type(u.exc_value) for u in reported] == [SystemExit]  # any other unraisable is still reported
        assert reported[0].exc_value.code == 3
    finally:
        sys.unraisablehook = saved


@pytest.mark.parametrize("out, part", [("/proc/out", "'/proc/out' is not writable"), ("{file}", "is a file, not a folder")])
def test_train_checks_its_output_folder_before_anything_starts(out, part, data, tmp_path, capsys, no_ray, monkeypatch):
    from lora_diffusion.train import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    args = train_args(data, tmp_path, "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    args = [a for a in args if not a.startswith("train.output_dir=")] + [f"train.output_dir={out.replace('{file}', str(tmp_path / 'f'))}"]
    expect_refused(capsys, main(args), f"train.output_dir: ", part)
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, so none left FAILED
