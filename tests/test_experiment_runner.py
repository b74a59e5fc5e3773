"""benchmarks/experiment.py: the plan, the resume rule, the tables, and the shipped YAML it runs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import experiment as ex  # noqa: E402

from beamvq.cli import main  # noqa: E402


def _args(*argv: str):
    return ex.parse_args(["run", *argv])


def test_ceiling_labels_the_unlabelled_trajectories_and_keys_differ() -> None:
    jobs = ex.plan(_args("--arms", "base,vq,ceiling", "--train-samples", "16",
                         "--unlabelled-samples", "48", "--seeds", "0,1"))  # fmt: skip
    assert len(jobs) == 6 and len({j.key for j in jobs}) == 6
    ceiling = next(j for j in jobs if j.arm == "ceiling" and j.seed == 1)
    args = ceiling.cli_args(Path("/tmp/run"))
    assert args[args.index(f"{ex.SPLITS}.train_samples") + 1] == "64"
    assert args[args.index(f"{ex.SPLITS}.unlabelled_samples") + 1] == "0"
    assert args[args.index("--seed_everything") + 1] == "1"
    vq = next(j for j in jobs if j.arm == "vq" and j.seed == 0)
    vq_args = vq.cli_args(Path("/tmp/run"))
    assert vq_args[vq_args.index(f"{ex.SPLITS}.train_samples") + 1] == "16"
    assert vq_args[vq_args.index(f"{ex.SPLITS}.unlabelled_samples") + 1] == "48"
    assert [Path(f).name for f in vq.configs()] == ["ns_scarce.yaml", "vq.yaml"]
    assert vq.key == "ns_scarce/vq/n16_u48/seed0"


def test_backbone_yaml_gets_the_experiments_frames_and_overrides_change_the_key() -> None:
    (job,) = ex.plan(_args("--backbones", "fno", "--override=--trainer.max_epochs=2"))
    args = job.cli_args(Path("/tmp/run"))
    assert [Path(f).name for f in job.configs()] == ["ns_scarce.yaml", "fno.yaml"]
    assert args[args.index("--model.backbone.init_args.in_steps") + 1] == "4"
    assert args[args.index("--model.backbone.init_args.out_steps") + 1] == "2"
    assert args[-1] == "--trainer.max_epochs=2"
    assert job.key.startswith("ns_scarce/fno/base/n16_u0/seed0/") and len(job.key.split("/")) == 6


def test_plan_refuses_an_unknown_arm_and_a_ceiling_without_unlabelled() -> None:
    with pytest.raises(SystemExit, match="arms/nosuch.yaml not found"):
        ex.plan(_args("--arms", "nosuch"))
    with pytest.raises(SystemExit, match="ceiling arm needs --unlabelled-samples"):
        ex.plan(_args("--arms", "ceiling"))


def _row(arm: str, n: int, seed: int, mse: float, m: int = 0) -> dict:
    job = ex.Job("ns_scarce", arm, n, m, seed)
    labelled = job.labelled()
    return dict(key=job.key, experiment="ns_scarce", backbone="", arm=arm, train_samples=n,
                unlabelled_samples=m, seed=seed, labelled=labelled, fit_seconds=10.0, epochs=40,
                best_epoch=30, state_numel={"backbone": 100},
                metrics={"test/mse": mse, "test/mse_lead1": mse / 4})  # fmt: skip


def test_run_all_skips_finished_runs_and_records_failures(tmp_path: Path, monkeypatch) -> None:
    results = tmp_path / "r.jsonl"
    jobs = ex.plan(_args("--train-samples", "8,16"))
    results.write_text(json.dumps(_row("base", 8, 0, 1.0)) + "\n")
    calls = []

    def fake(job: ex.Job, runs: Path) -> dict:
        calls.append(job.key)
        if job.train_samples == 16:
            raise RuntimeError("exit 1")
        return _row(job.arm, job.train_samples, job.seed, 2.0)

    monkeypatch.setattr(ex, "run_job", fake)
    assert ex.run_all(jobs, results, tmp_path, 1) == 1  # the n16 run failed
    assert calls == ["ns_scarce/base/n16_u0/seed0"]  # n8 was already in the results
    assert len(ex.load_rows([results])) == 1  # a failed run appends nothing


def test_tables_give_the_scarcity_gap_and_the_paired_change() -> None:
    rows = [_row("base", 16, 0, 1.5), _row("base", 160, 0, 1.0),
            _row("base", 16, 0, 2.0, m=48), _row("base", 16, 1, 4.0, m=48),
            _row("vq", 16, 0, 1.0, m=48), _row("vq", 16, 1, 5.0, m=48)]  # fmt: skip
    text = ex.report_rows(rows)
    assert "| 16 | 1 | 1.5 | +50.0% |" in text and "| 160 | 1 | 1 | +0.0% |" in text
    # paired by seed: 1.0/2.0 - 1 = -50 %, 5.0/4.0 - 1 = +25 %: mean -12.5 %, 1 of 2 better
    assert "-12.5% (1/2 better)" in text
    assert "| base | 2 | 3 ± 1.4 |" in text


@pytest.mark.parametrize("arm", ["vq", "beamvq"])
def test_experiment_yaml_and_arms_compose(arm: str, capsys: pytest.CaptureFixture) -> None:
    exp = ROOT / "configs/experiments/ns_scarce.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(exp), "--config", str(ROOT / f"configs/experiments/arms/{arm}.yaml"),
              "--print_config"])  # fmt: skip
    cfg = yaml.safe_load(capsys.readouterr().out)
    model, data = cfg["model"], cfg["data"]["init_args"]
    assert model["backbone"]["class_path"] == "beamvq.backbones.UNet"  # the experiment's backbone
    assert model["bottleneck"]["init_args"]["learn_offset_scale"] is True
    assert (model["loss"]["candidate_loss"], model["loss"]["candidate_steps"]) == ("crps", "first")
    assert data["windows"]["rollout_steps"] == model["rollout_steps"] == 4
    assert data["generator"]["init_args"]["viscosity"] == 1e-4
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]
    assert {"ModelCheckpoint", "CodebookUsageReport"} <= set(callbacks)
    if arm == "beamvq":
        assert {"BeamSearchAugmentation", "PoolSignalShare"} <= set(callbacks)
        assert (data["pool"]["weight"], data["pool"]["capacity"]) == (1.0, 72)
    else:
        assert "BeamSearchAugmentation" not in callbacks


# -- two stages (issue 17 item 4): stage 3 fine-tunes a stage-1 run's best checkpoint ----------

STAGED = ("--arms", "ft_base,ft_beamvq", "--train-samples", "8", "--unlabelled-samples", "48",
          "--init-from-arm", "base", "--init-from-override=--trainer.max_epochs=80")  # fmt: skip


def test_a_staged_key_differs_from_its_stage_free_job_and_is_stable() -> None:
    jobs = ex.plan(_args(*STAGED, "--seeds", "0,1"))
    assert len(jobs) == 4 and len({j.key for j in jobs}) == 4
    ft = next(j for j in jobs if j.arm == "ft_base" and j.seed == 0)
    # stage 1: the base at 80 epochs, 0 unlabelled: the key of the 80-epoch rows already measured
    assert ft.init_from == ex.Job("ns_scarce", "base", 8, 0, 0, ("--trainer.max_epochs=80",))
    assert ft.init_from.key == "ns_scarce/base/n8_u0/seed0/e4c85b86"
    assert ft.key == "ns_scarce/ft_base/n8_u48/seed0/from-132e686d"  # stable across versions
    assert ft.key != ex.Job("ns_scarce", "ft_base", 8, 48, 0).key
    assert {j.init_from.key for j in jobs if j.seed == 1} == {"ns_scarce/base/n8_u0/seed1/e4c85b86"}
    assert [Path(f).name for f in ft.configs()] == ["ns_scarce.yaml", "ft_base.yaml"]
    record = ft.record()
    assert record["init_from"] == ft.init_from.key and record["init_from_arm"] == "base"
    assert record["init_from_overrides"] == ["--trainer.max_epochs=80"]
    # a stage-free row keeps the fields (and their order) of the rows already in the results
    assert list(ex.Job("ns_scarce", "vq", 8, 48, 0).record()) == [
        "experiment", "arm", "train_samples", "unlabelled_samples", "seed", "overrides", "backbone"
    ]  # fmt: skip
    # stage 3's own overrides key stage 3; early stopping is one more stage-1 override
    (es,) = ex.plan(_args("--arms", "ft_base", *STAGED[2:], "--init-from-early-stopping", "5",
                          "--override=--trainer.max_epochs=20"))  # fmt: skip
    assert es.overrides == ("--trainer.max_epochs=20",)
    spec = json.loads(es.init_from.overrides[-1].partition("+=")[2])
    assert spec["class_path"] == "pytorch_lightning.callbacks.EarlyStopping"
    assert spec["init_args"] == {"monitor": "val/loss", "mode": "min", "patience": 5}
    assert es.init_from.key != ft.init_from.key


def test_plan_refuses_stage_one_settings_without_a_stage_one_arm() -> None:
    with pytest.raises(SystemExit, match="give --init-from-arm too"):
        ex.plan(_args("--init-from-override=--trainer.max_epochs=80"))
    with pytest.raises(SystemExit, match="arms/nosuch.yaml not found"):
        ex.plan(_args("--arms", "ft_base", "--init-from-arm", "nosuch"))
    with pytest.raises(SystemExit, match="--init-from-early-stopping must be >= 1"):
        ex.plan(_args("--init-from-arm", "base", "--init-from-early-stopping", "0"))


def _fake_runs(monkeypatch: pytest.MonkeyPatch, fail: str = "") -> list[str]:
    """``run_job`` replaced: records the keys, writes the best checkpoint file, returns a row."""
    calls: list[str] = []

    def fake(job: ex.Job, runs: Path) -> dict:
        calls.append(job.key)
        if fail and job.key == fail:
            raise RuntimeError("exit 1")
        (runs / job.key / "checkpoints").mkdir(parents=True, exist_ok=True)
        (runs / job.key / "checkpoints" / "best.ckpt").write_bytes(b"")
        return dict(_row(job.arm, job.train_samples, job.seed, 2.0, job.unlabelled_samples),
                    key=job.key, **job.record())  # fmt: skip

    monkeypatch.setattr(ex, "run_job", fake)
    return calls


def test_run_all_runs_stage_one_first_and_redoes_a_lost_checkpoint_without_a_second_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, runs = tmp_path / "r.jsonl", tmp_path / "runs"
    jobs = ex.plan(_args(*STAGED, "--seeds", "0,1"))
    s0, s1 = (next(j.init_from for j in jobs if j.seed == s) for s in (0, 1))
    # seed 0's stage-1 row exists, its run folder is gone; seed 1 has no stage-1 run at all
    results.write_text(json.dumps(dict(_row("base", 8, 0, 1.0), key=s0.key)) + "\n")
    calls = _fake_runs(monkeypatch)
    assert ex.run_all(jobs, results, runs, 1) == 0
    assert calls[:2] == [s0.key, s1.key]  # both stage-1 runs before any fine-tune
    assert sorted(calls[2:]) == sorted(j.key for j in jobs)
    rows = ex.load_rows([results])
    assert [r["key"] for r in rows].count(s0.key) == 1  # redone into its folder, no second row
    assert rows[0]["metrics"]["test/mse"] == 1.0  # the row made then is the one kept
    assert {r["key"] for r in rows} == {s0.key, s1.key, *(j.key for j in jobs)}
    staged = [r for r in rows if r.get("init_from")]
    assert {r["init_from"] for r in staged} == {s0.key, s1.key}
    calls.clear()
    assert ex.run_all(jobs, results, runs, 1) == 0 and calls == []  # all done: nothing runs
    # a new fine-tune whose stage 1 has its row and checkpoint starts at once
    (more,) = ex.plan(_args("--arms", "ft_vq", *STAGED[2:], "--seeds", "1"))
    assert ex.run_all([more], results, runs, 1) == 0 and calls == [more.key]


def test_a_failed_stage_one_skips_its_fine_tunes(tmp_path: Path, monkeypatch) -> None:
    results, runs = tmp_path / "r.jsonl", tmp_path / "runs"
    jobs = ex.plan(_args(*STAGED, "--seeds", "0,1"))
    bad = next(j.init_from.key for j in jobs if j.seed == 0)
    calls = _fake_runs(monkeypatch, fail=bad)
    assert ex.run_all(jobs, results, runs, 2) == 1
    assert not [c for c in calls if "/seed0/" in c and c != bad]  # no seed-0 fine-tune ran
    keys = {r["key"] for r in ex.load_rows([results])}
    assert keys == {j.key for j in jobs if j.seed == 1} | {
        next(j.init_from.key for j in jobs if j.seed == 1)
    }


def _staged_row(arm: str, seed: int, mse: float, stage1: dict) -> dict:
    key = f"ns_scarce/{arm}/n8_u48/seed{seed}/from-x{seed}"
    return dict(_row(arm, 8, seed, mse, m=48), key=key, init_from=stage1["key"],
                init_from_arm="base", init_from_overrides=["--trainer.max_epochs=80"],
                last_logged={"augment/pool_signal_share": 0.25})  # fmt: skip


def test_the_report_pairs_each_fine_tune_with_its_stage_one_run_and_ft_base() -> None:
    plain = [_row("base", 8, 0, 0.6), _row("base", 8, 0, 0.7, m=48), _row("vq", 8, 0, 0.63, m=48)]
    s1 = [dict(_row("base", 8, s, mse), key=f"ns_scarce/base/n8_u0/seed{s}/e4c85b86",
               overrides=["--trainer.max_epochs=80"])
          for s, mse in ((0, 0.5), (1, 0.4))]  # fmt: skip
    staged = [_staged_row("ft_base", 0, 0.45, s1[0]), _staged_row("ft_base", 1, 0.42, s1[1]),
              _staged_row("ft_vq", 0, 0.40, s1[0]),
              _staged_row("ft_vq", 1, 0.42, s1[1])]  # fmt: skip
    text = ex.report_rows(plain + s1 + staged)
    # the tables of rows without init_from are those of a report without the fine-tunes
    assert text.startswith(ex.report_rows(plain + s1) + "\n\n")
    part = text[text.index("stage 3 from stage 1 = base --trainer.max_epochs=80: 8 labelled") :]
    lines = {ln.split(" | ")[0]: ln for ln in part.splitlines() if ln.startswith("| ")}
    assert lines["| stage 1: base"].startswith("| stage 1: base | 2 | 0.45 ± 0.071 |")
    # ft_base against its stage-1 runs: 0.45/0.5 - 1 = -10 %, 0.42/0.4 - 1 = +5 %: -2.5 %
    assert "| -2.5% (1/2 better) | – | 40(30)/40(30) |" in lines["| ft_base"]
    # ft_vq: vs stage 1 -20 % and +5 % (-7.5 %); vs ft_base 0.40/0.45 - 1 and 0 (-5.6 %, 1 of 2)
    assert "| -7.5% (1/2 better) | -5.6% (1/2 better) |" in lines["| ft_vq"]
    assert "| 0.25 ± 0 |" in lines["| ft_vq"]  # the pool's share of the lr-weighted signal
    assert list(lines)[:4] == ["| arm", "| stage 1: base", "| ft_base", "| ft_vq"]


def _tiny_experiment(root: Path) -> Path:
    """``ns_scarce.yaml`` shrunk to seconds (8 trajectories of 8 frames at 16x16, a 1-level
    U-Net, 2 epochs of 2 batches), with ``arms/ft_base.yaml`` beside it: a CONFIGS folder."""
    cfg = yaml.safe_load((ROOT / "configs/experiments/ns_scarce.yaml").read_text())
    cfg["trainer"].update(max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                          limit_test_batches=1)  # fmt: skip
    cfg["model"]["backbone"]["init_args"].update(in_steps=2, out_steps=1, base_width=8, depth=1,
                                                 norm_groups=4)  # fmt: skip
    cfg["model"]["rollout_steps"] = 2
    data = cfg["data"]["init_args"]
    data.update(path=str(root / "tiny.nc"), loader={"batch_size": 4})
    data["windows"] = {"in_steps": 2, "out_steps": 1, "rollout_steps": 2}
    data["splits"]["fractions"] = [4, 2, 2]
    data["generator"]["init_args"].update(n_trajectories=8, resolution=16, n_frames=8, burn_in=0.5)
    (root / "arms").mkdir(parents=True)
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    (root / "arms" / "ft_base.yaml").write_text(
        (ROOT / "configs/experiments/arms/ft_base.yaml").read_text()
    )
    return root


def test_a_staged_run_fine_tunes_from_its_stage_one_checkpoint_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 1 (base, early stopping) then ft_base through the real ``beamvq fit``/``test``
    commands: at learning rate 0 the fine-tune keeps the stage-1 weights, so its first
    validation loss is stage 1's best and its test MSE stage 1's (started from them)."""
    import torch

    monkeypatch.setattr(ex, "CONFIGS", _tiny_experiment(tmp_path / "configs"))
    results, runs = tmp_path / "r.jsonl", tmp_path / "runs"
    (job,) = ex.plan(_args("--experiment", "tiny", "--arms", "ft_base", "--train-samples", "4",
                           "--init-from-arm", "base", "--init-from-early-stopping", "3",
                           "--override=--trainer.max_epochs=1",
                           "--override=--model.optimizer.init_args.lr=0.0"))  # fmt: skip
    assert ex.run_all([job], results, runs, 1) == 0
    rows = {r["key"]: r for r in ex.load_rows([results])}
    first, ft = rows[job.init_from.key], rows[job.key]
    assert ft["init_from"] == job.init_from.key and "init_from" not in first
    start = runs / job.init_from.key / "checkpoints" / "best.ckpt"
    saved = torch.load(runs / job.key / "checkpoints" / "best.ckpt", map_location="cpu",
                       weights_only=False)  # fmt: skip
    assert saved["hyper_parameters"]["init_from"] == str(start)
    stage1 = torch.load(start, map_location="cpu", weights_only=True)
    assert any(k.startswith("EarlyStopping") for k in stage1["callbacks"])  # the stage-1 option
    val = [float(r["val/loss"]) for r in csv.DictReader((runs / job.key / "metrics.csv").open())
           if r.get("val/loss")]  # fmt: skip
    assert val[0] == pytest.approx(first["best_val_loss"], rel=1e-5)
    assert ft["metrics"]["test/mse"] == pytest.approx(first["metrics"]["test/mse"], rel=1e-5)


@pytest.mark.parametrize("arm", ["ft_base", "ft_vq", "ft_pushforward", "ft_beamvq"])
def test_fine_tuning_arms_share_the_budget_and_a_rate_that_does_not_vanish(
    arm: str, capsys: pytest.CaptureFixture
) -> None:
    exp = ROOT / "configs/experiments/ns_scarce.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(exp), "--config",
              str(ROOT / f"configs/experiments/arms/{arm}.yaml"), "--print_config"])  # fmt: skip
    cfg = yaml.safe_load(capsys.readouterr().out)
    model, data = cfg["model"], cfg["data"]["init_args"]
    assert cfg["trainer"]["max_epochs"] == 30
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == 5e-4
    assert (model["lr_schedule"]["scheduler"], model["lr_schedule"]["min_lr"]) == ("cosine", 5e-5)
    assert model["backbone"]["class_path"] == "beamvq.backbones.UNet"
    assert (model["bottleneck"] is None) == (arm == "ft_base")
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in cfg["trainer"]["callbacks"]}
    assert "ModelCheckpoint" in callbacks
    searches = arm in ("ft_pushforward", "ft_beamvq")
    assert ("BeamSearchAugmentation" in callbacks) == searches
    if searches:  # from the first fine-tune epochs; pool = the 72 windows of 8 trajectories
        assert callbacks["BeamSearchAugmentation"]["init_args"]["start_epoch"] == 1
        assert "PoolSignalShare" in callbacks
        assert (data["pool"]["capacity"], data["pool"]["weight"]) == (72, 1.0)


def test_a_row_redone_on_another_machine_supersedes_the_old_one_in_place() -> None:
    import experiment_report

    old = {"key": "a", "machine": "m1", "metrics": {"test/mse": 1.0}}
    other = {"key": "b", "metrics": {"test/mse": 2.0}}
    new = {"key": "a", "machine": "m2", "redone": True, "metrics": {"test/mse": 0.5}}
    assert experiment_report.latest_rows([old, other, new]) == [new, other]


def test_rows_record_the_machine() -> None:
    import experiment_facts

    first, second = experiment_facts.machine_id(), experiment_facts.machine_id()
    assert first == second and "torch" in first and "[" in first


def test_the_authors_arm_is_marked_as_leaking_in_every_table() -> None:
    import experiment_facts
    import experiment_report

    arms = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "arms"
    assert experiment_facts.leaks_validation([arms / "authors_leak.yaml"])
    for name in ("vq", "beamvq", "pushforward", "ft_beamvq"):
        assert not experiment_facts.leaks_validation([arms / f"{name}.yaml"]), name
    rows = [
        {"arm": "authors_leak", "leaks_validation": True},
        {"arm": "authors_leak", "leaks_validation": False},
    ]
    assert experiment_report.arm_label("authors_leak", rows) == "authors_leak (LEAKS VALIDATION)"
    assert experiment_report.arm_label("vq", [{"arm": "vq"}]) == "vq"


def test_the_authors_arm_is_refused_without_naming_the_leak() -> None:
    from beamvq.callbacks.search_inputs import SearchInputs

    with pytest.raises(ValueError, match="allow_validation_leak"):
        SearchInputs(windows=0, validation=32)
    assert SearchInputs(windows=0, validation=32, allow_validation_leak=True).windows == 0


@pytest.mark.parametrize(
    "arm",
    sorted(
        p.stem
        for p in (Path(__file__).resolve().parents[1] / "configs/experiments/arms").glob("*.yaml")
    ),
)
def test_every_arm_builds_through_the_cli(
    arm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every class of the composed experiment + arm configs is built (callbacks, model, data);
    # only the training itself is replaced (an arm that cannot start is found here, not after
    # a campaign launched it)
    import pytorch_lightning as pl

    from beamvq.cli import main

    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: None)
    cli = main(["fit", "--config", str(root / "ns_scarce.yaml"), "--config", str(root / "arms" / f"{arm}.yaml"),
                "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    assert cli.model is not None and cli.datamodule is not None
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert "LastCheckpoint" in names
