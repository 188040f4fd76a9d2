"""The smoke training job end to end on Ray Train (2 CPU workers, gloo): checkpoints, MLflow, recovery.

One reference job runs once per module; the fault test runs the same config with rank 1 raising
mid-epoch and must end with bitwise-identical weights, EMA, masks and metrics.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
mlflow_tracking = pytest.importorskip("mlflow.tracking")

from job_helpers import all_artifacts, load_train_cli  # noqa: E402

from orchestrator import checkpoints, ray_train  # noqa: E402
from orchestrator.config.loading import load_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE = REPO_ROOT / "experiments" / "configs" / "smoke.yaml"
EXPERIMENT = "itest-train"


def _cfg(root: Path, name: str, **extra):
    return load_config(SMOKE, {
        "run.name": name, "run.storage_path": str(root / "ray"), "run.max_failures": 1,
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}", "tracking.experiment": EXPERIMENT,
        "tracking.offline_dir": str(root / "offline"), "train.checkpoint_every_steps": 5, **extra,
    })


def _final_state(result) -> dict:
    with result.checkpoint.as_directory() as d:
        state, _ = checkpoints.load_checkpoint_dir(d)
    return state


def _client(cfg):
    return mlflow_tracking.MlflowClient(cfg.tracking.uri)


def _run_of(cfg):
    client = _client(cfg)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`slak.run_name` = '{cfg.run.name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = _cfg(root, "reference")
    t0 = time.monotonic()
    result = ray_train.run_training(cfg)
    return cfg, result, time.monotonic() - t0


def test_smoke_job_end_to_end(reference) -> None:
    cfg, result, seconds = reference
    m = result.metrics
    assert m["epochs_done"] == 2 and m["step"] == 16
    for key in ("train/loss", "train/lr", "val/top1", "val/top5", "ema/top1", "perf/img_per_s", "sparsity/churn",
                "sparsity/itop_rate", "sparsity/prune_rate", "sparsity/density/stages.0"):
        assert key in m and math.isfinite(m[key]), key
    # a sanity bound on the logged metric; exact per-layer counts are the sparsity engine tests' job
    assert m["sparsity/density"] == pytest.approx(0.6, abs=0.01)

    # checkpoints: sealed, the newest kept ones only, with the full trainer state
    run_dir = Path(cfg.run.storage_path) / "reference"
    kept = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(("epoch_", "step_")))
    assert "epoch_0002" in kept and len(kept) <= cfg.run.checkpoints_to_keep, kept
    state = _final_state(result)
    assert state["epoch"] == 2 and state["sparsity"]["step"] == 16 and len(state["rng"]) == 2
    for name, mask in state["sparsity"]["masks"].items():
        assert not state["model"][name][~mask].any(), name

    # MLflow: one FINISHED run with dotted params, per-epoch metrics, masks, density table, config, checkpoint
    run = _run_of(cfg)
    client = _client(cfg)
    assert run.info.status == "FINISHED"
    assert run.data.params["sparse.sparsity"] == "0.4" and run.data.params["run.num_workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val/top1")) == 2
    # two series, never one key with two meanings: per-step values every 2 steps, the epoch means per epoch
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) >= 8
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    files = all_artifacts(client, run.info.run_id)
    assert "masks.npz" in files and any(f.startswith("masks/history_from_step") for f in files), files
    assert any(f.startswith("masks/density") for f in files), files
    assert "config/resolved.yaml" in files and "checkpoint/state.pt" in files
    assert run.data.tags.get("slak.kernel.backend")


def test_worker_failure_resumes_to_identical_result(reference, tmp_path: Path, monkeypatch) -> None:
    ref_cfg, ref_result, _ = reference
    monkeypatch.setenv(ray_train.FAULT_ENV, "1:12")  # rank 1 raises after step 12 (epoch 2, after step ckpt 10)
    cfg = _cfg(Path(ref_cfg.run.storage_path).parent, "faulty")
    result = ray_train.run_training(cfg)
    marker = Path(cfg.run.storage_path) / "faulty" / ".fault_injected_rank1_step12"
    assert marker.exists(), "the injected fault never fired"

    ref, got = _final_state(ref_result), _final_state(result)
    for key in ("model", "ema"):
        for name, a in ref[key].items():
            assert torch.equal(a, got[key][name]), f"{key}.{name} differs after recovery"
    for name, a in ref["sparsity"]["masks"].items():
        assert torch.equal(a, got["sparsity"]["masks"][name]), f"mask {name} differs after recovery"
    same = {k: v for k, v in ref_result.metrics.items() if not k.startswith("perf/")}
    assert {k: result.metrics[k] for k in same} == same

    client = _client(cfg)
    ref_run, run = _run_of(ref_cfg), _run_of(cfg)
    assert run.info.status == "FINISHED"
    for key in ("val/top1", "ema/top1", "sparsity/churn"):
        hist = [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, key)]
        ref_hist = [(h.step, h.value) for h in client.get_metric_history(ref_run.info.run_id, key)]
        assert hist == ref_hist, key


def test_rerunning_a_finished_job_continues_it(reference) -> None:
    cfg, first, _ = reference
    again = ray_train.run_training(cfg)
    assert again.metrics["val/top1"] == first.metrics["val/top1"] and again.metrics["step"] == 16
    run = _run_of(cfg)
    assert run.info.status == "FINISHED"
    assert len(_client(cfg).get_metric_history(run.info.run_id, "val/top1")) == 2


def test_bad_config_fails_fast_with_one_message(capsys) -> None:
    cli = load_train_cli()
    t0 = time.monotonic()
    code = cli.main(["--config", str(SMOKE), "data.image_size=8", "sparse.sparsity=2", "train.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 5
    assert err.count("error:") == 1 and "3 problems" in err
    assert "data.image_size=8" in err and "sparse.sparsity=2" in err and "did you mean 'train.lr'" in err


def test_a_missing_data_folder_exits_2_in_seconds_without_ray(tmp_path: Path, capsys) -> None:
    cli = load_train_cli()
    t0 = time.monotonic()
    code = cli.main(["--config", str(SMOKE), "data.source=imagenet", f"data.path={tmp_path / 'nowhere'}",
                     f"run.storage_path={tmp_path / 'ray'}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 20
    assert err.count("error:") == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "ray").exists(), "nothing may be written for a job that cannot start"


def test_same_run_name_with_other_settings_exits_2_before_ray(tmp_path: Path, capsys) -> None:
    """A second job under an existing run.name with a different sparsity must not resume the first one."""
    from orchestrator import run_identity
    from orchestrator.config.loading import to_yaml

    storage = tmp_path / "ray"
    first = load_config(str(SMOKE), {"run.name": "collide", "run.storage_path": str(storage)})
    run_identity.check_or_record(str(storage), "collide", run_identity.identity(first.to_flat()),
                                 yaml_text=to_yaml(first))  # what the first job's start recorded
    cli = load_train_cli()
    t0 = time.monotonic()
    code = cli.main(["--config", str(SMOKE), "run.name=collide", f"run.storage_path={storage}",
                     "sparse.sparsity=0.7", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 10
    assert "sparse.sparsity: 0.4 when it started, 0.7 now" in err and err.count("error:") == 1


def test_a_job_that_fails_for_good_ends_with_its_cause_and_how_to_resume(ray_cluster, tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    monkeypatch.setenv(ray_train.FAULT_ENV, "0:3")  # rank 0 raises after optimizer step 3; no retry allowed
    cli = load_train_cli()
    code = cli.main(["--config", str(SMOKE), "run.name=doomed", f"run.storage_path={tmp_path / 'ray'}",
                     "run.max_failures=0", "train.epochs=1", "tracking.enabled=false"])
    last = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()][-2:]
    assert code == 1
    assert "failed for good" in last[0] and "rank 0" in last[0] and "fails at optimizer step 3" in last[0], last
    assert "running the same command again resumes" in last[1], last


def test_interrupted_checkpoint_write_is_refused(tmp_path: Path) -> None:
    path = checkpoints.save_checkpoint_dir({"epoch": 1, "step": 3, "w": torch.arange(1000)}, tmp_path / "ck")
    state, manifest = checkpoints.load_checkpoint_dir(tmp_path / "ck")
    assert state["step"] == 3 and manifest["step"] == 3
    path.write_bytes(path.read_bytes()[:100])  # the process died while writing
    with pytest.raises(ValueError, match="does not match its manifest"):
        checkpoints.load_checkpoint_dir(tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not completely written"):
        checkpoints.load_checkpoint_dir(tmp_path / "ck")


class _Payload:
    """Unpickling this runs a shell command: what a planted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)


def test_planted_pickle_payload_is_refused_and_does_not_run(tmp_path: Path) -> None:
    """The manifest proves integrity, not authorship: a payload sealed with a valid manifest must still not run."""
    marker = tmp_path / "payload-ran"
    checkpoints.save_checkpoint_dir({"epoch": 1, "step": 3, "evil": _Payload(marker)}, tmp_path / "ck")
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to unpickle"):
        checkpoints.load_checkpoint_dir(tmp_path / "ck")
    assert not marker.exists(), "the planted payload ran"


def test_a_checkpoint_of_the_previous_layout_still_resumes(tmp_path: Path) -> None:
    """Checkpoints written before the RNG states became tensors hold NumPy's state tuple: they load with NumPy's
    array globals allowed (and nothing else), and the loop restores the state from the tuple."""
    import json

    import numpy as np

    from orchestrator.loop import set_rng_state

    np.random.seed(5)
    old_numpy = np.random.get_state()
    checkpoints.save_checkpoint_dir({"epoch": 1, "step": 3, "numpy": old_numpy}, tmp_path / "ck")
    manifest_path = tmp_path / "ck" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["layout"]  # as the previous version wrote it
    manifest_path.write_text(json.dumps(manifest))
    state, _ = checkpoints.load_checkpoint_dir(tmp_path / "ck")
    np.random.seed(0)
    set_rng_state({"python": __import__("random").getstate(), "numpy": state["numpy"],
                   "torch": torch.get_rng_state()})
    assert np.random.get_state()[2] == old_numpy[2] and (np.random.get_state()[1] == old_numpy[1]).all()


def test_skipped_images_are_counted_over_all_ranks(ray_cluster, tmp_path: Path) -> None:
    """An ImageNet-layout folder with 4 unreadable training files, data.on_bad_image=skip, 2 workers: the job
    trains, and ``data/skipped_images`` (summed over ranks) reaches Ray and MLflow. Every training file is
    read at least twice (the epoch, then the EMA's BatchNorm recalibration pass over the whole shard)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("ant", "bee", "cow", "doe"):
            for i in range(n):
                path = tmp_path / "imgs" / split / c / f"{c}{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, quality=90)
    broken = [tmp_path / "imgs" / "train" / c / f"{c}{i}.jpg" for c, i in (("ant", 1), ("bee", 5), ("cow", 2),
                                                                           ("doe", 7))]
    for path in broken:
        path.write_bytes(path.read_bytes()[:200])  # truncated mid-stream
    cfg = _cfg(tmp_path, "skips", **{"data.source": "imagenet", "data.path": str(tmp_path / "imgs"),
                                     "data.num_classes": 4, "data.on_bad_image": "skip", "train.epochs": 1,
                                     "train.bn_recalibration_batches": 2})
    result = ray_train.run_training(cfg)
    assert result.metrics["epochs_done"] == 1
    assert result.metrics["data/skipped_images"] == len(broken), result.metrics  # files, not reads
    hist = _client(cfg).get_metric_history(_run_of(cfg).info.run_id, "data/skipped_images")
    assert [h.value for h in hist] == [result.metrics["data/skipped_images"]]
