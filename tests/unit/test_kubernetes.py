"""The Kubernetes manifests (deploy/kubernetes) against the real schemas of a current
Kubernetes release (kubernetes-validate, strict: an unknown or misplaced field fails),
their kustomizations complete, the privileges they grant exactly what each daemon needs,
and the settings they carry accepted by the daemons' own parsers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from interceptd import options as ioptions
from tcpcopyd.online import options as toptions
from tcpcopyd.service.settings import load

# the test extras have them; the Debian package build (which runs the unit tests with
# Debian's Python modules) has no kubernetes-validate: there this file is skipped
kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in ROOT.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = sorted(ROOT.rglob("kustomization.yaml"))
VERSION = kubernetes_validate.latest_version()
# what each daemon's container may hold, and nothing more
CAPABILITIES = {"tcpcopyd": {"NET_RAW", "NET_ADMIN"}, "interceptd": {"NET_ADMIN", "NET_RAW"}}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def containers(doc: dict) -> list[dict]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def test_there_is_something_to_check():
    assert len(MANIFESTS) >= 8 and len(KUSTOMIZATIONS) == 3


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_validates_strictly(path):
    for doc in documents(path):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_kustomizations_name_every_manifest_once_and_nothing_missing():
    named = []
    for k in KUSTOMIZATIONS:
        spec = yaml.safe_load(k.read_text())
        assert spec["kind"] == "Kustomization"
        for r in spec["resources"]:
            target = (k.parent / r).resolve()
            assert target.exists(), f"{k}: {r}"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{k}: {r}"
            else:
                # kustomize loads no file from outside a kustomization's folder
                assert target.parent == k.parent, f"{k}: {r} is outside its folder"
                named.append(target)
    assert sorted(named) == [p.resolve() for p in MANIFESTS]


def test_each_daemon_runs_with_its_capabilities_and_nothing_more():
    seen = set()
    for path in MANIFESTS:
        for doc in documents(path):
            for c in containers(doc):
                daemon = c.get("command", [""])[0]
                if daemon not in CAPABILITIES:
                    assert "securityContext" not in c or not c["securityContext"].get(
                        "privileged"), c["name"]
                    continue
                seen.add(daemon)
                sc = c["securityContext"]
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert set(sc["capabilities"]["add"]) == CAPABILITIES[daemon]
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False
                assert not sc.get("privileged")
                assert c["resources"]["limits"]["memory"]
    assert seen == set(CAPABILITIES)


def mib(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def test_the_settings_they_carry_are_accepted_and_the_memory_limit_follows_m(tmp_path):
    configs = {}
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == "ConfigMap":
                configs.update(doc["data"])
    conf = tmp_path / "tcpcopyd.conf"
    conf.write_text(configs["tcpcopyd.conf"])
    cfg = load("tcpcopyd", "", toptions.REGISTRY, ["--config", str(conf)], toptions.LAYOUT)
    conf = tmp_path / "interceptd.conf"
    conf.write_text(configs["interceptd.conf"])
    icfg = load("interceptd", "", ioptions.REGISTRY, ["--config", str(conf)], ioptions.LAYOUT)
    assert icfg.secret_file and cfg.secret_file
    [daemonset] = [d for p in MANIFESTS for d in documents(p)
                   if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "tcpcopyd"]
    [c] = containers(daemonset)
    # -m plus the constant of README "Security model" (512 MiB, as the unit's MemoryMax)
    assert mib(c["resources"]["limits"]["memory"]) >= cfg.memory + 512
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == cfg.metrics_listen[1]


def test_secrets_are_mounted_as_files_not_through_the_volumes_links():
    """A secret volume's files are symbolic links (..data/...), which the daemons refuse
    to follow (read_secret: O_NOFOLLOW): each secret is mounted by subPath, as a file."""
    mounted = 0
    for path in MANIFESTS:
        for doc in documents(path):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
            for c in spec.get("containers", []):
                for m in c.get("volumeMounts", []):
                    if m["name"] in secrets:
                        mounted += 1
                        assert m.get("subPath"), (path.name, c["name"], m)
    assert mounted >= 3
