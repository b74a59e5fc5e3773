"""benchmarks/experiment.py: the plan, the resume rule, the tables, and the shipped YAML it runs."""

from __future__ import annotations

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
