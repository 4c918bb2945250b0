"""The training loop without Ray (LocalReporter): resume equality, every method, NaN, checkpoints, preflight."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from lora_diffusion.config import config_from_dict, load_config
from lora_diffusion.train_reporters import LocalReporter
from lora_diffusion.train import (
    NonFiniteLossError,
    ResumableSampler,
    cosine_with_warmup,
    main,
    train_loop,
)

POS = ["a great movie", "the best film , very fun", "i love this story", "good and funny", "great fun , a gem"]
NEG = ["a bad movie", "the worst film , very dull", "i hate this story", "boring and sad", "dull and bad"]


def write_sst2(root: Path, n_train: int = 64, n_val: int = 16) -> Path:
    """A few SST-2-shaped JSON Lines rows (Hub schema) under root/sst2/."""
    rng = random.Random(0)
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(root / "sst2" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = rng.randint(0, 1)
                f.write(json.dumps({"sentence": rng.choice(POS if label else NEG) + " ", "label": label, "idx": i}) + "\n")
    return root


def tiny_overrides(data_dir: Path, *extra: str) -> list[str]:
    return [
        "model.base=builtin:tiny", "model.max_length=40", f"task.data_dir={data_dir}", "task.eval_subset_size=8",
        "method.lora_diffusion.rank_early=8", "method.lora_diffusion.rank_mid=4", "method.lora_diffusion.rank_late=2",
        "method.weight_lora.r=4", "method.adapters.bottleneck=8", "method.prefix_tuning.num_prefix=4",
        "train.batch_size=8", "train.warmup_steps=2", "train.torch_threads=1", "train.eval_at_end=false",
        "train.lr=0.003", "tracking.enabled=false", *extra,
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("data"))


def run(cfg, folder, resume_from=None, mlflow=None):
    rep = LocalReporter(folder, resume_from=resume_from)
    out = train_loop({"config": cfg.to_dict(), "mlflow": mlflow, "resume_from": None, "trial_name": "t"}, rep)
    return rep, out


def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    """Interrupted at step 5 (the testing hook) and resumed from step 4's checkpoint: the same curve."""
    # 64 examples / batch 8 = 8 batches per epoch; 2 micro-batches per step: the epoch turns at step 4
    over = tiny_overrides(data_dir, "train.max_steps=8", "train.report_every=1", "train.grad_accum=2",
                          "train.weight_decay=0.01", "diffusion.time=continuous")
    full, _ = run(load_config(None, over), tmp_path / "full")

    interrupted = load_config(None, over + ["train.fail_at_step=5"])
    part = LocalReporter(tmp_path / "part")
    with pytest.raises(RuntimeError, match="train.fail_at_step=5"):
        train_loop({"config": interrupted.to_dict(), "mlflow": None}, part)
    assert [r["step"] for r in part.reports] == [1, 2, 3, 4]
    resumed = LocalReporter(tmp_path / "resumed")  # resume_from as `--resume-from` passes it; goes past step 5 now
    train_loop({"config": interrupted.to_dict(), "mlflow": None, "resume_from": str(part.checkpoints[-1])}, resumed)
    assert [r["step"] for r in resumed.reports] == [5, 6, 7, 8]

    curve = part.reports + resumed.reports
    for key in ("loss", "denoise_loss", "lr", "reg_rank", "epoch"):
        assert [r[key] for r in curve] == pytest.approx([r[key] for r in full.reports], rel=1e-6, abs=1e-9), key
    from safetensors.torch import load_file

    w_full = load_file(str(full.checkpoints[-1] / "adapter" / "adapter_model.safetensors"))
    w_res = load_file(str(resumed.checkpoints[-1] / "adapter" / "adapter_model.safetensors"))
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-5, atol=1e-7)


def test_checkpoint_layout_has_no_pickle_and_the_resolved_config(data_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(data_dir, "train.max_steps=2", "train.report_every=2"))
    rep, out = run(cfg, tmp_path / "ck")
    ckpt = rep.checkpoints[-1]
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert files == ["adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "config.yaml", "train_state.json", "train_state.safetensors"]  # README.md: the model card
    assert load_config(ckpt / "config.yaml") == cfg
    state = json.loads((ckpt / "train_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (2, 0, 2)
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["task"] == "sst2"
    for name in ("loss", "denoise_loss", "reg_rank", "reg_orth", "ce_early", "ce_mid", "ce_late", "lr", "tokens_per_s",
                 "samples_per_s", "peak_mem_mb", "trainable_params", "total_params", "step", "epoch"):
        assert name in out, name


@pytest.mark.parametrize("method", ["weight_lora", "adapters", "prefix_tuning", "bitfit", "full_ft"])
def test_every_other_method_trains(method, data_dir, tmp_path):
    from lora_diffusion.adapter import load_adapter

    cfg = load_config(None, tiny_overrides(data_dir, f"method.name={method}", "train.max_steps=3", "train.report_every=3"))
    rep, out = run(cfg, tmp_path / method)
    assert out["step"] == 3 and torch.isfinite(torch.tensor(out["loss"]))
    assert 0 < out["trainable_params"] <= out["total_params"]
    if method != "full_ft":
        assert out["trainable_params"] < out["total_params"]
    adaptation, _, acfg = load_adapter(str(rep.checkpoints[-1] / "adapter"))
    assert acfg["method"] == method and acfg["step"] == 3


def test_nan_loss_stops_with_a_clear_error_and_a_failed_mlflow_run(data_dir, tmp_path):
    from lora_diffusion.tracking import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, tiny_overrides(data_dir, "train.max_steps=5", "train.report_every=1", "train.inject_nan_at_step=3"))
    rep = LocalReporter(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match=r"loss became nan .* at step 3 .*inject_nan_at_step"):
        train_loop({"config": cfg.to_dict(), "mlflow": {"tracking_uri": uri, "experiment": "nan"}}, rep)
    assert [r["step"] for r in rep.reports] == [1, 2]
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("nan").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "NonFiniteLossError: loss became nan" in runs[0].data.tags["error"]


def test_loop_owned_mlflow_run_with_eval_and_runs_uri(data_dir, tmp_path, monkeypatch, capsys):
    """A run the loop creates: params, metric history, artifacts; evaluate/generate load runs:/<id>/adapter."""
    from lora_diffusion import evaluate as evaluate_cmd
    from lora_diffusion import generate as generate_cmd
    from lora_diffusion.adapter import load_adapter
    from lora_diffusion.tracking import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, tiny_overrides(data_dir, "train.max_steps=4", "train.report_every=2", "train.eval_at_end=true",
                                           "train.eval_every=2", "train.val_examples=8"))
    rep, out = run(cfg, tmp_path / "ck", mlflow={"tracking_uri": uri, "experiment": "own", "tags": {"run_type": "trial"}})
    c = client(uri)
    r = c.get_run(out["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["run_type"] == "trial" and r.data.tags["method"] == "lora_diffusion"
    assert r.data.params["method.lora_diffusion.rank_early"] == "8" and r.data.params["train.max_steps"] == "4"
    assert [m.step for m in c.get_metric_history(r.info.run_id, "loss")] == [2, 4]
    assert [m.step for m in c.get_metric_history(r.info.run_id, "val_loss")] == [2, 4]
    assert "eval_accuracy" in r.data.metrics and "eval_denoise_acc" in r.data.metrics
    arts = {a.path for a in c.list_artifacts(r.info.run_id)} | {a.path for a in c.list_artifacts(r.info.run_id, "eval")}
    assert {"adapter", "config.yaml", "eval/metrics.json", "eval/predictions.jsonl"} <= arts

    # the MLflow adapter equals the last checkpoint's, bit for bit, in outputs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from_mlflow, _, _ = load_adapter(f"runs:/{r.info.run_id}/adapter")
    from_disk, tok, _ = load_adapter(str(rep.checkpoints[-1] / "adapter"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, len(tok), (3, 20), generator=gen)
    t = torch.tensor([0.2, 0.5, 0.9])
    instr = torch.zeros(3, 20, dtype=torch.bool)
    instr[:, 1:6] = True
    target = torch.zeros_like(instr)
    target[:, 12:] = True
    assert torch.equal(from_mlflow(x, t, None, instr, target_mask=target), from_disk(x, t, None, instr, target_mask=target))

    capsys.readouterr()
    assert evaluate_cmd.main(["--adapter", f"runs:/{r.info.run_id}/adapter", "--data-dir", str(data_dir), "--limit", "4",
                              "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_examples"] == 4
    assert generate_cmd.main(["--adapter", f"runs:/{r.info.run_id}/adapter", "--prompt", "a great movie", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"] == "a great movie"


def test_resuming_a_finished_run_still_reports_the_final_adapter(data_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(data_dir, "train.max_steps=2", "train.report_every=1"))
    first, _ = run(cfg, tmp_path / "a")
    again, out = run(cfg, tmp_path / "b", resume_from=first.checkpoints[-1])
    assert [r["step"] for r in again.reports] == [2] and out["trainable_params"] > 0
    assert (again.checkpoints[-1] / "adapter" / "adapter_model.safetensors").is_file()


def test_bf16_autocast_on_cpu(data_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(data_dir, "train.precision=bf16", "train.max_steps=2", "train.report_every=2"))
    _, out = run(cfg, tmp_path / "bf16")
    assert torch.isfinite(torch.tensor(out["loss"]))


@pytest.mark.parametrize("native, ran", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_resolved_on_the_device_and_recorded_as_what_ran(native, ran, data_dir, tmp_path, monkeypatch):
    """train.precision=auto trains in bf16 only where the device computes it natively; the checkpoint's config and
    the adapter's model card name the precision that ran, not 'auto'."""
    from lora_diffusion import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    seen = []

    def recording_autocast(p, device):  # what each training step's autocast resolves to
        seen.append(precision.resolve(p, device))
        return precision.autocast_for(p, device)

    monkeypatch.setattr("lora_diffusion.train.autocast_for", recording_autocast)
    cfg = load_config(None, tiny_overrides(data_dir, "train.precision=auto", "train.max_steps=2", "train.report_every=2"))
    rep, out = run(cfg, tmp_path / "auto")
    assert seen and set(seen) == {ran}
    ckpt = rep.checkpoints[-1]
    assert load_config(ckpt / "config.yaml").train.precision == ran
    assert f"seed 0, {ran})" in (ckpt / "adapter" / "README.md").read_text()


def test_example_configs_load():
    folder = Path(__file__).resolve().parents[1] / "lora_diffusion" / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


@pytest.mark.parametrize("method", ["lora_diffusion", "bitfit"])
def test_ddp_covers_exactly_the_trainable_parameters(method, tiny_config, tmp_path):
    """DDP (a one-rank gloo group here) manages exactly what trains; LoRA-Diffusion's frozen base stays out."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lora_diffusion.methods import build_method
    from lora_diffusion.model import load_base
    from lora_diffusion.train import DiffusionObjective, keep_frozen_base_out_of_ddp

    cfg = config_from_dict({**tiny_config.to_dict(), "method": {"name": method}})
    denoiser, tok = load_base(cfg.model)
    adaptation = build_method(cfg.method, denoiser)
    objective = DiffusionObjective(adaptation, cfg.diffusion, tok.mask_token_id, (1 / 3, 2 / 3))
    keep_frozen_base_out_of_ddp(objective)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DDP(objective, find_unused_parameters=True)
        managed = {id(p) for p in ddp._module_parameters if p.requires_grad}
        assert managed == {id(p) for _, p in adaptation.trainable_named_parameters()}
        if method == "lora_diffusion":
            assert all(n.startswith("adaptation.denoiser.") for n in ddp.parameters_to_ignore)
            assert not {id(p) for p in ddp._module_parameters} & {id(p) for p in denoiser.parameters()}
    finally:
        dist.destroy_process_group()


def test_sampler_resumes_inside_an_epoch():
    data = list(range(20))
    s = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    s.set_epoch(2)
    order = list(s)
    s.skip = 4
    assert list(s) == order[4:] and len(s) == len(order) - 4
    other = ResumableSampler(data, num_replicas=2, rank=0, seed=3)
    other.set_epoch(2)
    assert not set(other) & set(order)


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(2, 10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


@pytest.mark.parametrize("extra, message", [
    (["task.data_dir=/nonexistent/data"], "task.data_dir='/nonexistent/data': folder does not exist"),
    (["train.precision=fp16"], "fp16 with a grad scaler needs a GPU"),
    (["train.num_workers=64"], "train.num_workers=64 x train.cpus_per_worker=2"),
    (["model.base=/nonexistent/base"], "model.base: folder '/nonexistent/base' does not exist"),
    (["train.max_steps=5", "train.warmup_steps=9"], "train.warmup_steps: got 9"),
    (["method.lora_diffusion.rank_mid=0"], "method.lora_diffusion.rank_mid"),
    (["tracking.tracking_uri=sqlite:////nonexistent/dir/m.db", "tracking.enabled=true"], "tracking URI sqlite:////nonexistent"),
])
def test_command_rejects_bad_input_before_starting_ray(extra, message, data_dir, capsys):
    import ray

    assert main(tiny_overrides(data_dir) + extra) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_command_rejects_a_checkpoint_of_another_method(data_dir, tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(data_dir, "train.max_steps=1", "train.report_every=1"))
    rep, _ = run(cfg, tmp_path / "ck")
    assert main(tiny_overrides(data_dir, "method.name=bitfit") + ["--resume-from", str(rep.checkpoints[-1])]) == 2
    assert "method.name: got 'bitfit', but the checkpoint" in capsys.readouterr().err
    assert main(tiny_overrides(data_dir) + ["--resume-from", str(tmp_path)]) == 2
    assert "train_state.json is missing" in capsys.readouterr().err
    assert config_from_dict(cfg.to_dict()) == cfg


def test_make_trainer_hands_the_controller_poll_interval_to_ray(monkeypatch, tmp_path):
    """Ray Train's controller takes one report per poll (default 2 s): make_trainer sets the interval from
    train.controller_poll_s in the variable Ray passes on to its controller actor."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    from lora_diffusion.train import make_trainer

    monkeypatch.setenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR, "9")  # restored after the test, whatever make_trainer sets
    cfg = load_config(None, tiny_overrides(tmp_path, "train.controller_poll_s=0.25", f"train.output_dir={tmp_path}"))
    make_trainer(cfg, {"config": cfg.to_dict()})
    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR in ENV_VARS_TO_PROPAGATE
    assert float(os.environ[HEALTH_CHECK_INTERVAL_S_ENV_VAR]) == 0.25


@pytest.mark.parametrize("seed", [0, 5])
def test_a_reloaded_adapter_sits_on_the_base_it_was_trained_on_whatever_the_seed(seed, data_dir, tmp_path, monkeypatch):
    """The base's newly initialised parts (the tiny base entirely; MiniLM's MLM head and every base's
    timestep MLP) do not depend on train.seed, so an adapter reloads onto the very base it was trained
    on. (Under seed 5 it once reloaded onto a different random base: SST-2 accuracy 0.75 -> 0.00.)"""
    import lora_diffusion.model as model_module
    from lora_diffusion.adapter import load_adapter

    trained_on = {}
    real_load_base = model_module.load_base

    def spy(*args, **kwargs):
        denoiser, tok = real_load_base(*args, **kwargs)
        trained_on.update({k: v.clone() for k, v in denoiser.state_dict().items()})
        return denoiser, tok

    monkeypatch.setattr(model_module, "load_base", spy)
    cfg = load_config(None, tiny_overrides(data_dir, f"train.seed={seed}", "train.max_steps=2", "train.report_every=2"))
    rep, _ = run(cfg, tmp_path / "run")
    monkeypatch.setattr(model_module, "load_base", real_load_base)
    reloaded, _, _ = load_adapter(str(rep.checkpoints[-1] / "adapter"))
    base_now = reloaded.denoiser.state_dict()
    # every frozen base tensor equals the one the loop trained on (the adapter's own tensors are checked elsewhere)
    assert trained_on and base_now.keys() == trained_on.keys()
    assert all(torch.equal(base_now[k], trained_on[k]) for k in trained_on)
