"""Tuning settings fail before any trial starts; ``labelmatch tune`` documents every flag."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from typer.testing import CliRunner

from labelmatch.cli import app, register_commands
from labelmatch.core.errors import ConfigError
from labelmatch.tuning.pbt import TuneConfig
from labelmatch.tuning.search_space import ClipToBounds, SearchSpace

register_commands()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"search_space": {"lr": [1e-3, 1e-5]}}, r"'lr' range is reversed: low 0.001 > high 1e-05"),
        ({"search_space": {"dropout": [0.0, 0.2]}}, r"unknown hyper-parameter.*: dropout"),
        ({"trials": 1}, r"PBT needs at least 2 trials"),
        ({"search_space": {"warmup_ratio": [0.0, 1.5]}}, r"'warmup_ratio' must stay below 1"),
        ({"search_space": {"lora_ranks": [8, 0]}}, r"'lora_ranks' must be positive integers"),
        ({"keep_checkpoints": 1}, r"keep_checkpoints must be None \(all\) or >= 3"),
        ({"resources_per_trial": {"GPU": -1}}, r"resources_per_trial"),
        ({"epochs": 3}, r"unknown TuneConfig field\(s\): epochs"),
    ],
)
def test_bad_settings_raise_config_error(values, message):
    with pytest.raises(ConfigError, match=message):
        TuneConfig.from_dict(values)


def test_tune_config_file_and_inline_values_are_type_checked(tmp_path):
    """``tune --config`` (a file: its line; inline JSON: the flag) and ``--search-space``/``--resources``:
    a value of the wrong type is one line naming the field, nothing is started."""
    from labelmatch.core.errors import DataError

    config = tmp_path / "tune.yaml"
    config.write_text("trials: 4\ntrain_config:\n  epochs: 2\n  lr: fast\n")
    result = CliRunner().invoke(app, ["tune", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                                      "--config", str(config)])
    assert isinstance(result.exception, DataError), result.output
    assert str(result.exception) == (f"{config}:4: field 'train_config.lr': expected a number, "
                                     "got a string 'fast'")
    inline = CliRunner().invoke(app, ["tune", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                                      "--config", '{"trials": "4"}'])
    assert isinstance(inline.exception, ConfigError)
    assert str(inline.exception) == "--config: field 'trials': expected an integer, got a string '4'"
    space = CliRunner().invoke(app, ["tune", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                                     "--search-space", '{"lr": ["1e-4", 1e-3]}'])
    assert str(space.exception) == "--search-space: field 'lr[0]': expected a number, got a string '1e-4'"
    resources = CliRunner().invoke(app, ["tune", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                                         "--resources", '{"GPU": "1"}'])
    assert str(resources.exception) == "--resources: field 'GPU': expected a number, got a string '1'"
    assert not (tmp_path / "m").exists()
    good = CliRunner().invoke(app, ["tune", "--data", "s3://datasets/tax", "--out", "model", "--rayjob",
                                    "--dry-run", "--storage-path", "s3://tuning/runs",
                                    "--config", '{"trials": 3, "train_config": {"lr": 0.002}}'])
    assert good.exit_code == 0, good.output
    args = shlex.split(yaml.safe_load(good.output)["spec"]["entrypoint"])
    shipped = TuneConfig.from_dict(json.loads(args[args.index("--config") + 1]))
    assert shipped.trials == 3 and shipped.train_config.lr == 0.002
    from labelmatch.cli.tune import _json_option  # what the RayJob's pod reads back, inline

    read_back = _json_option(json.dumps(shipped.to_dict()), "--config", TuneConfig)
    assert TuneConfig.from_dict(read_back) == shipped
    with pytest.raises(ConfigError, match=r"field 'search_space.lora_ranks\[1\]': expected an integer"):
        TuneConfig.from_dict({"search_space": {"lora_ranks": [8, 16.5]}})


def test_random_search_may_run_one_trial_and_config_round_trips():
    config = TuneConfig.from_dict({"scheduler": "random", "trials": 1, "search_space": {"lora_ranks": [8]}})
    again = TuneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_initial_population_is_seeded_and_covers_every_rank():
    space = SearchSpace()
    population = space.initial_population(4, seed=3)
    assert population == space.initial_population(4, seed=3)
    assert sorted(p["lora_rank"] for p in population) == [4, 8, 16, 32]
    for point in population:
        assert space.lr[0] <= point["lr"] <= space.lr[1]
        assert space.scale[0] <= point["scale"] <= space.scale[1]


def test_explore_is_clipped_to_the_search_space():
    clip = ClipToBounds({"lr": (1e-4, 3e-3), "scale": (10.0, 40.0)})
    clipped = clip({"lr": 3e-3 * 1.2, "scale": 9.0, "lora_rank": 8})
    assert clipped == {"lr": 3e-3, "scale": 10.0, "lora_rank": 8}


def test_synchronous_pbt_moves_a_sync_point_that_no_paused_trial_can_reach():
    """After a resume from a killed driver, every unfinished trial may wait paused at or past the
    sync point with none running (the one they waited for ended without a result): Ray would
    wait forever; ResumablePBT moves the point one interval past the slowest trial."""
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from ray.tune.experiment import Trial

    from labelmatch.tuning.scheduler import ResumablePBT

    class StubTrial:
        def __init__(self, status: str):
            self.status = status

        def is_finished(self) -> bool:
            return self.status in (Trial.TERMINATED, Trial.ERROR)

    trials = [StubTrial(Trial.PAUSED), StubTrial(Trial.PAUSED), StubTrial(Trial.PAUSED),
              StubTrial(Trial.TERMINATED)]
    controller = SimpleNamespace(get_trials=lambda: trials)
    pbt = ResumablePBT(time_attr="training_iteration", metric="val_macro_f1", mode="max",
                       perturbation_interval=1, synch=True, hyperparam_mutations={"lr": [1e-4, 1e-3]})
    for trial, time in zip(trials, (4, 3, 3, 3), strict=True):
        pbt._trial_state[trial] = SimpleNamespace(last_train_time=time)
    pbt._next_perturbation_sync = 3
    trials[1].status = Trial.RUNNING  # its next result moves the clock: nothing to do
    assert pbt.choose_trial_to_run(controller) is None and pbt._next_perturbation_sync == 3
    trials[1].status = Trial.PAUSED  # ... but it paused without one: nobody can reach time 3
    assert pbt.choose_trial_to_run(controller) in trials[1:3]
    assert pbt._next_perturbation_sync == 4


def test_help_documents_every_flag():
    result = CliRunner().invoke(app, ["tune", "--help"], terminal_width=200)
    assert result.exit_code == 0
    command = next(c for c in app.registered_commands if c.callback.__name__ == "tune")
    import inspect

    for name in inspect.signature(command.callback).parameters:
        assert "--" + name.replace("_", "-") in result.output, name


def test_bad_search_space_fails_in_one_line_before_any_trial(tmp_path, sample_dir):
    import subprocess
    import sys

    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-c", "from labelmatch.cli import main; main()", "tune", "--data", str(sample_dir),
         "--out", str(out), "--search-space", '{"lr": [5e-5, 1e-6]}'],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: search space 'lr' range is reversed: low 5e-05 > high 1e-06"
    ]
    assert not out.exists() and not (tmp_path / "ray_results").exists()


def test_rayjob_dry_run_carries_the_whole_config_to_the_cluster():
    result = CliRunner().invoke(app, [
        "tune", "--data", "s3://datasets/tax", "--out", "model", "--trials", "4", "--rayjob", "--dry-run",
        "--storage-path", "s3://tuning/runs", "--resources", '{"GPU": 1, "CPU": 4}', "--workers", "4",
        "--node-selector", "pool=a10", "--toleration", "nvidia.com/gpu:NoSchedule", "--image", "lm:1",
    ])
    assert result.exit_code == 0, result.output
    manifest = yaml.safe_load(result.output)
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["nodeSelector"] == {"pool": "a10"}
    assert workers["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    args = shlex.split(manifest["spec"]["entrypoint"])
    assert args[:2] == ["labelmatch", "tune"]
    # One work prefix per run (<storage>/<name>-<time>): outputs are immutable artifacts.
    work = args[args.index("--upload-to") + 1].removesuffix("/outputs")
    assert re.fullmatch(r"s3://tuning/runs/labelmatch-tune-\d{8}T\d{6}Z", work), work
    shipped = TuneConfig.from_dict(json.loads(args[args.index("--config") + 1]))
    assert shipped.address == "auto" and shipped.resources_per_trial == {"GPU": 1, "CPU": 4}
    assert shipped.trials == 4 and shipped.storage_path == f"{work}/ray"
