"""What one trial asks for against what a cluster has: GPUs by default where they exist, workers fitted to
them, and a clear error in place of an endless PENDING (fake clusters with 0, 1 and 4 GPUs)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from orchestrator.config.loading import load_config  # noqa: E402
from orchestrator.ray_cluster import ResourceError, fit_resources  # noqa: E402
from orchestrator.tune_runner import fitting_concurrency  # noqa: E402

CPU_BOX = {"CPU": 2.0}
ONE_GPU = {"CPU": 16.0, "GPU": 1.0}
FOUR_GPUS = {"CPU": 64.0, "GPU": 4.0}


def _fit(cluster: dict, **overrides):
    return fit_resources(load_config(None, {"train.global_batch_size": 48, **overrides}), cluster).run


@pytest.mark.parametrize(
    "cluster,use_gpu,workers",
    [(CPU_BOX, False, 2), (ONE_GPU, True, 1), (FOUR_GPUS, True, 4)],
    ids=["0-gpus", "1-gpu", "4-gpus"],
)
def test_auto_uses_the_gpus_there_are_one_worker_each(cluster: dict, use_gpu: bool, workers: int) -> None:
    run = _fit(cluster)
    assert (run.use_gpu, run.num_workers) == (use_gpu, workers)


def test_explicit_settings_are_kept_when_they_fit() -> None:
    run = _fit(FOUR_GPUS, **{"run.use_gpu": False, "run.num_workers": 3})
    assert (run.use_gpu, run.num_workers) == (False, 3)
    assert _fit(FOUR_GPUS, **{"run.num_workers": 2}).num_workers == 2


@pytest.mark.parametrize(
    "cluster,overrides,message",
    [
        (CPU_BOX, {"run.use_gpu": True}, r"run.use_gpu=true but the cluster has no GPUs .*run.use_gpu=auto"),
        (ONE_GPU, {"run.num_workers": 2}, r"2 worker\(s\) x 1 GPU = 2 GPUs, the cluster has 1: set run.num_workers=1"),
        (ONE_GPU, {"run.gpus_per_worker": 2}, r"lower run.gpus_per_worker to at most 1"),
        (CPU_BOX, {"run.num_workers": 3, "run.use_gpu": False}, r"asks for 3 CPUs .* the cluster has 2"),
    ],
    ids=["gpu-on-cpu-box", "two-gpus-on-one", "two-gpus-per-worker", "too-many-cpus"],
)
def test_what_can_never_fit_is_refused_with_the_setting_to_change(cluster: dict, overrides: dict,
                                                                  message: str) -> None:
    with pytest.raises(ResourceError, match=message):
        _fit(cluster, **overrides)


def test_small_trials_share_a_big_gpu() -> None:
    cfg = fit_resources(load_config(None, {"run.gpus_per_worker": 0.25, "tune.max_concurrent_trials": 8,
                                           "train.global_batch_size": 48}), ONE_GPU, trial_driver_cpus=1)
    assert (cfg.run.use_gpu, cfg.run.num_workers) == (True, 1)
    assert fitting_concurrency(cfg, ONE_GPU) == 4  # four quarter-GPU trials at once on one GPU


def test_concurrency_fits_the_cpus_too() -> None:
    cfg = fit_resources(load_config(None, {"tune.max_concurrent_trials": 4}), {"CPU": 7.0}, trial_driver_cpus=1)
    assert fitting_concurrency(cfg, {"CPU": 7.0}) == 2  # each trial: 1 driver + 2 workers


def test_a_setting_that_needs_a_gpu_is_checked_again_once_auto_resolves_to_cpu() -> None:
    with pytest.raises(ResourceError, match=r"2 CPU worker\(s\) .*fp16.*bf16"):
        _fit(CPU_BOX, **{"train.precision": "fp16"})
    assert _fit(ONE_GPU, **{"train.precision": "fp16"}).use_gpu is True


def test_a_batch_that_does_not_divide_over_the_fitted_workers_is_a_resource_error() -> None:
    with pytest.raises(ResourceError, match=r"3 GPU worker\(s\).*train.global_batch_size=32"):
        fit_resources(load_config(None, {"train.global_batch_size": 32}), {"CPU": 48.0, "GPU": 3.0})


def test_fractional_shares_are_counted_exactly() -> None:
    cfg = fit_resources(load_config(None, {"run.gpus_per_worker": 0.2, "tune.max_concurrent_trials": 5,
                                           "train.global_batch_size": 48}), ONE_GPU, trial_driver_cpus=1)
    assert fitting_concurrency(cfg, ONE_GPU) == 5  # float floor division would say 4


def _laptop_grid(cluster: dict):
    from orchestrator.cli import LAPTOP_DEFAULTS

    return fit_resources(load_config(None, dict(LAPTOP_DEFAULTS)), cluster, trial_driver_cpus=1)


@pytest.mark.parametrize(
    "cluster,gpu_gib,at_once",
    [({"CPU": 16.0, "GPU": 1.0}, 80.0, 16), ({"CPU": 8.0, "GPU": 1.0}, 80.0, 8),
     ({"CPU": 16.0, "GPU": 1.0}, 4.0, 4), ({"CPU": 16.0, "GPU": 1.0}, None, 16),
     ({"CPU": 64.0, "GPU": 2.0}, 6.0, 12)],
    ids=["h100-16-cores", "h100-8-cores", "4-GiB-laptop-gpu", "memory-unknown", "two-6-GiB-gpus"],
)
def test_the_embedded_default_shares_a_gpu_as_far_as_cpus_and_gpu_memory_allow(cluster: dict, gpu_gib, at_once: int
                                                                               ) -> None:
    cfg = _laptop_grid(cluster)
    assert (cfg.run.use_gpu, cfg.run.num_workers) == (True, 1)
    assert fitting_concurrency(cfg, cluster, gpu_gib) == at_once


def test_gpu_memory_is_read_from_nvidia_smi_without_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from orchestrator import ray_cluster

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '81559\\n4096\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ray_cluster.local_gpu_memory_gib() == 4.0  # the smallest GPU decides
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    assert ray_cluster.local_gpu_memory_gib() is None
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert ray_cluster.local_gpu_memory_gib() is None


def test_the_trainer_asks_ray_for_the_fitted_gpu_share() -> None:
    from orchestrator.ray_train import build_trainer

    cfg = fit_resources(load_config(None, {"run.gpus_per_worker": 0.25, "train.global_batch_size": 48}), ONE_GPU)
    scaling = build_trainer(cfg, run_name="share").scaling_config
    assert scaling.use_gpu and scaling.num_workers == 1
    assert scaling.resources_per_worker == {"CPU": 1, "GPU": 0.25}


def test_a_local_request_that_cannot_fit_is_refused_before_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Locally the answer comes from this machine's CPUs and CUDA's GPU count, not from a started Ray."""
    import ray
    import torch

    from orchestrator import ray_cluster, ray_train

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process (a test session may hold one)
    started = []
    monkeypatch.setattr(ray_cluster, "init_ray", lambda **kw: started.append(kw))
    cfg = load_config(None, {"run.use_gpu": True, "run.num_workers": 2})
    with pytest.raises(ResourceError, match=r"2 worker\(s\) x 1 GPU = 2 GPUs, the cluster has 1"):
        ray_train.run_training(cfg)
    assert not started
    ray_cluster.check_local_machine(load_config(None, {"run.use_gpu": True, "run.num_workers": 1}), num_cpus=4)


class _GrowingCluster:
    """A fake autoscaling cluster: ``CPU_BOX`` until ``grows_at`` seconds of a fake clock, then one GPU."""

    def __init__(self, grows_at: float) -> None:
        self.now, self.grows_at, self.asked, self.reads = 0.0, grows_at, [], 0

    def resources(self) -> dict:
        self.reads += 1
        return ONE_GPU if self.now >= self.grows_at else CPU_BOX

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _fit_waiting(cluster: _GrowingCluster, wait_s: float, **overrides):
    from orchestrator.ray_cluster import fit_resources_waiting

    cfg = load_config(None, {"train.global_batch_size": 48, "run.use_gpu": True, **overrides})
    return fit_resources_waiting(cfg, trial_driver_cpus=1, wait_s=wait_s, poll_s=10,
                                 cluster_resources=cluster.resources, sleep=cluster.sleep,
                                 clock=lambda: cluster.now, ask_autoscaler=cluster.asked.append)


def test_a_growing_cluster_is_waited_for_and_shown(caplog: pytest.LogCaptureFixture) -> None:
    cluster = _GrowingCluster(grows_at=25)
    with caplog.at_level("WARNING", logger="orchestrator.ray_cluster"):
        cfg = _fit_waiting(cluster, wait_s=60)
    assert (cfg.run.use_gpu, cfg.run.num_workers) == (True, 1)
    assert cluster.reads == 4 and cluster.now == 30  # read at 0, 10, 20 (still no GPU), 30
    assert cluster.asked == [[{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]]  # asked once, for one trial's bundles
    waits = [r.getMessage() for r in caplog.records if "waiting for the cluster to grow" in r.getMessage()]
    assert len(waits) == 3 and "60 s left" in waits[0] and "no GPUs" in waits[0]


def test_waiting_gives_up_after_the_set_time_with_the_reason() -> None:
    cluster = _GrowingCluster(grows_at=1e9)
    with pytest.raises(ResourceError, match=r"no GPUs .*after waiting 45 s .*run.wait_for_resources_s"):
        _fit_waiting(cluster, wait_s=45)
    assert cluster.now == 45


def test_without_waiting_a_refusal_says_how_to_wait_for_an_autoscaler() -> None:
    cluster = _GrowingCluster(grows_at=5)
    with pytest.raises(ResourceError, match=r"no GPUs .*If this cluster autoscales, set run.wait_for_resources_s"):
        _fit_waiting(cluster, wait_s=0)
    assert cluster.reads == 1 and cluster.asked == []


def test_waiting_on_a_local_ray_is_named_as_without_effect(caplog: pytest.LogCaptureFixture) -> None:
    from orchestrator.ray_cluster import warn_if_wait_has_no_effect

    cfg = load_config(None, {"run.wait_for_resources_s": 600})
    with caplog.at_level("WARNING", logger="orchestrator.ray_cluster"):
        warn_if_wait_has_no_effect(cfg, address="auto")
        assert not caplog.records
        warn_if_wait_has_no_effect(cfg, address=None)
    assert "run.wait_for_resources_s=600 has no effect on a local Ray" in caplog.text
