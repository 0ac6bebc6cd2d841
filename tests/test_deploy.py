"""Deploy files checked by the tools that will read them: Ray's own launcher validation, KubeRay's CRD schemas,
and the image's install script run for real in a fresh virtualenv."""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "cluster" / "deploy"
KUBERAY = Path(__file__).parent / "reference" / "kuberay"
RAY_PIN = re.search(r"^ray==(\S+)$", (REPO / "requirements.lock").read_text(), re.M).group(1)
VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
IMAGES = {f"geodiff4d:{VERSION}-cpu", f"geodiff4d:{VERSION}-gpu"}  # the tags `make image` builds


def _launcher() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def test_launcher_yaml_passes_rays_validation():
    """What `ray up` does before it touches a cloud: fill in the provider's defaults, validate the schema."""
    config = _launcher()
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 8  # a typo Ray must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_runs_the_image_with_token_auth_and_shared_storage():
    config = _launcher()
    nodes = config["available_node_types"]
    images = {config["docker"]["image"]} | {
        n["docker"]["worker_image"] for n in nodes.values() if "docker" in n
    }
    assert images == IMAGES
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1 and "GPU" not in nodes["cpu_worker"]["resources"]
    assert nodes["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    assert config["setup_commands"] == []  # nothing installed at start: the image is the code
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "-v /data:/data" in config["docker"]["run_options"]


def _strict(schema: dict) -> dict:
    """The CRD schema as `kubectl apply --validate=strict` applies it: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def _kuberay_schema(plural: str) -> dict:
    schema = json.loads(gzip.decompress((KUBERAY / f"ray.io_v1_{plural}.schema.json.gz").read_bytes()))
    schema = _strict(schema)
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    return schema


def _manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_the_kuberay_crds():
    schemas = {"RayCluster": _kuberay_schema("rayclusters"), "RayJob": _kuberay_schema("rayjobs")}
    validated = []
    for doc in _manifests():
        if doc["apiVersion"] == "ray.io/v1":
            jsonschema.validate(doc, schemas[doc["kind"]])
            validated.append(doc["kind"])
    assert sorted(validated) == ["RayCluster", "RayJob"]
    cluster = next(d for d in _manifests() if d["kind"] == "RayCluster")
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["rayStartParam"] = {}  # a typo the strict schema must refuse
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schemas["RayCluster"])


def test_raycluster_uses_the_image_token_secret_and_rwx_storage():
    docs = {d["kind"]: d for d in _manifests()}
    spec = docs["RayCluster"]["spec"]
    assert spec["rayVersion"] == RAY_PIN
    assert spec["authOptions"] == {"mode": "token", "secretName": "geodiff4d-ray-token"}
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for name, group in groups.items():
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        images.add(container["image"])
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == (name == "gpu") and container["image"].endswith(
            "-gpu" if gpus else "-cpu"
        )
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in pod[
            "volumes"
        ]
    assert images == IMAGES
    job = docs["RayJob"]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": docs["RayCluster"]["metadata"]["name"]}
    assert job["entrypoint"].startswith("geodiff4d ")


def test_dockerfile_builds_on_the_pinned_ray_image_with_the_install_script():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{RAY_PIN}-py311-cpu" in dockerfile
    assert "RUN bash cluster/deploy/install.sh" in dockerfile
    makefile = (REPO / "Makefile").read_text()
    assert "rayproject/ray:$(RAY_VERSION)-py311-gpu" in makefile


def _pinned_dependencies_without_the_project(folder: Path) -> Path:
    """A folder of links to this environment's installed distributions, less geodiff4d itself (its dist-info
    and editable-install finder): pip in a fresh virtualenv that has it on sys.path finds every pinned
    dependency already satisfied, so the install script's own steps run in seconds instead of downloading
    torch, and still have to install the package."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("geodiff4d", "__editable__", "__pycache__")):
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_script_in_a_fresh_virtualenv(tmp_path):
    """The Dockerfile's install step, run here: a regular (not editable) install with the pinned dependencies
    gives a working `geodiff4d --help` and `geodiff4d synth`, importing the installed copy."""
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):  # the files an image build would copy
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    venv = tmp_path / "venv"
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base_python), "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = _pinned_dependencies_without_the_project(tmp_path / "deps")
    (Path(purelib) / "pinned-dependencies.pth").write_text(f"{deps}\n")  # after the venv's own site-packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"PYTHON": python, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    absent = subprocess.run([python, "-c", "import geodiff4d"], env=env, cwd=tmp_path, capture_output=True)
    assert absent.returncode != 0  # only the install script can make it importable
    install = subprocess.run(
        ["bash", str(source / "cluster" / "deploy" / "install.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    where = subprocess.run(
        [python, "-c", "import geodiff4d; print(geodiff4d.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(purelib), where  # installed, not the checkout
    cli = str(venv / "bin" / "geodiff4d")
    help_text = subprocess.run(
        [cli, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert all(command in help_text.stdout for command in ("synth", "pack", "verify", "train", "eval"))
    out = tmp_path / "synth"
    synth = subprocess.run(
        [
            cli,
            "synth",
            "--out",
            str(out),
            "--subjects",
            "1",
            "--frames",
            "2",
            "--cameras",
            "2",
            "--resolution",
            "64",
            "--synthetic",
            "2",
            "--workers",
            "1",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert synth.returncode == 0, synth.stdout + synth.stderr[-3000:]
    assert len(list((out / "synthhuman").rglob("*.png"))) >= 2
    assert list((out / "nersemble").rglob("*.mp4"))
