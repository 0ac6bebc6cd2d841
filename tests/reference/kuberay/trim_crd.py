"""Regenerate the vendored KubeRay schemas from the CRDs of a kuberay checkout (see README.md here):

    python tests/reference/kuberay/trim_crd.py KUBERAY/helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml ...

Keeps the ``v1`` openAPIV3Schema of each CRD, drops its ``description`` texts (most of the bytes), writes
``ray.io_v1_<plural>.schema.json.gz`` beside this script (gzip without a timestamp, so reruns are byte-identical).
"""

import gzip
import json
import sys
from pathlib import Path

import yaml


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


for crd_path in sys.argv[1:]:
    crd = yaml.safe_load(Path(crd_path).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strip_descriptions(v1["schema"]["openAPIV3Schema"])
    out = Path(__file__).with_name(f"ray.io_v1_{crd['spec']['names']['plural']}.schema.json.gz")
    out.write_bytes(gzip.compress(json.dumps(schema, sort_keys=True, indent=0).encode(), mtime=0))
    print(out, out.stat().st_size)
