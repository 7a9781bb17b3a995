"""One daemon per instance name, in a runtime directory nobody else can write; the shared
secret's file checked like ssh checks a key."""
from __future__ import annotations

import os

import pytest

from interceptd.options import Settings
from shm import rundir
from shm import segment as shmseg
from tcpcopyd.service.instance import InstanceError, InstanceLock
from tcpcopyd.service.settings import Config, ConfigError, load_secret


def test_a_second_lock_on_a_name_fails_and_names_the_holder():
    name = f"test-lock-{os.getpid()}"
    first = InstanceLock(name).acquire()
    try:
        with pytest.raises(InstanceError, match=rf"instance '{name}' is already running "
                                                rf"\(pid {os.getpid()}\)"):
            InstanceLock(name).acquire()
    finally:
        first.release()
    InstanceLock(name).acquire().release()       # free again


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 64, "sp ace"])
def test_bad_instance_names_are_refused(name):
    with pytest.raises(InstanceError, match="instance name"):
        InstanceLock(name)


def test_an_untrusted_runtime_directory_or_segment_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    monkeypatch.setattr(rundir, "RUNTIME_DIR", str(d))
    with pytest.raises(rundir.UntrustedPath, match="writable by group or others"):
        rundir.ensure()
    os.chmod(d, 0o755)
    link = tmp_path / "link"
    link.symlink_to(d)
    monkeypatch.setattr(rundir, "RUNTIME_DIR", str(link))
    with pytest.raises(rundir.UntrustedPath, match="symbolic link"):
        rundir.ensure()
    monkeypatch.setattr(rundir, "RUNTIME_DIR", str(d))
    seg = shmseg.create("planted", 1, 1, 0, 64)
    seg.close()
    os.chmod(d / "planted.shm", 0o666)
    with pytest.raises(shmseg.SegmentError, match="writable by group or others"):
        shmseg.attach("planted")
    (d / "junk.shm").write_bytes(b"x" * 200)
    os.chmod(d / "junk.shm", 0o600)
    with pytest.raises(shmseg.SegmentError, match="not a tcpcopyd segment"):
        shmseg.attach("junk")


def secret_cfg(tmp_path, data: bytes, mode: int) -> Config:
    path = tmp_path / "secret"
    path.write_bytes(data)
    os.chmod(path, mode)
    cfg = Settings(secret_file=str(path))
    cfg.source["secret_file"] = "/etc/interceptd.conf [interceptd]"
    return cfg


def test_the_secret_file_must_be_private_and_long_enough(tmp_path):
    cfg = secret_cfg(tmp_path, b"  0123456789abcdefXYZ\n", 0o600)
    load_secret(cfg)
    assert cfg.secret == b"0123456789abcdefXYZ"
    with pytest.raises(ConfigError, match=r"/etc/interceptd.conf: \[interceptd\] secret_file = "
                                          r".*others may read it \(mode 0644\): chmod 600"):
        load_secret(secret_cfg(tmp_path, b"0123456789abcdefXYZ", 0o644))
    with pytest.raises(ConfigError, match="5 bytes: a secret has 16 to 4096 bytes") as e:
        load_secret(secret_cfg(tmp_path, b"short", 0o600))
    assert e.value.code == 78
