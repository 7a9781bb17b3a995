"""Command-line and config errors: one line naming what is wrong, non-zero exit."""
from __future__ import annotations

import subprocess

import pytest

from tcpcopyd.lab.lab import command
from tcpcopyd.online.options import servers, transfers
from tcpcopyd.service.settings import SettingError

GOOD = ["-x", "80-198.18.2.2:80", "-s", "198.18.2.2", "-i", "lo"]


def run(prog, *args):
    return subprocess.run([*command(prog), *args], capture_output=True, text=True, timeout=30)


def test_unknown_flag():
    r = run("tcpcopyd", *GOOD, "--frobnicate")
    assert r.returncode == 2
    assert "unrecognized arguments: --frobnicate" in r.stderr


@pytest.mark.parametrize("bad", ["80", "80-198.18.2.2", "x-198.18.2.2:80", "80-1.2.3:80",
                                 "80-198.18.2.2:70000", "80-198.18.2.2:80,80-198.18.2.3:80",
                                 "80-198.18.2.2:80,198.18.1.2:80-198.18.2.3:80"])
def test_malformed_transfer_rule(bad):
    r = run("tcpcopyd", "-x", bad, "-s", "198.18.2.2", "-i", "lo")
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"tcpcopyd: -x {bad!r}")


def test_missing_required_setting():
    r = run("tcpcopyd", "-x", "80-198.18.2.2:80", "-i", "lo")
    assert r.returncode == 2 and "-s / --server is required" in r.stderr


def test_transfer_and_server_parsing():
    [a, b] = transfers("80-198.18.2.2:8080,198.18.1.2:11211-198.18.2.3:11211")
    assert (a.online_ip, a.port, a.target_ip, a.target_port) == (None, 80, "198.18.2.2", 8080)
    assert (b.online_ip, b.port) == ("198.18.1.2", 11211)
    assert servers("198.18.2.2,198.18.2.3:4000") == [("198.18.2.2", 36524),
                                                      ("198.18.2.3", 4000)]
    with pytest.raises(SettingError):
        servers("198.18.2.2:0")


def test_config_file_errors_name_file_key_and_reason(tmp_path):
    cfg = tmp_path / "tcpcopyd.conf"
    cfg.write_text('[default]\ntransfer = "80-198.18.2.2:80"\nmtu = "big"\n')
    r = run("tcpcopyd", "--config", str(cfg), "-s", "198.18.2.2", "-i", "lo")
    assert r.returncode == 78
    assert r.stderr.strip() == (f"tcpcopyd: {cfg}: [default] mtu = 'big': expected an "
                                "integer from 576 to 65535")
    cfg.write_text('[default]\nmtuu = 1500\n')
    r = run("tcpcopyd", "--config", str(cfg), *GOOD)
    assert r.returncode == 78 and "mtuu: unknown key" in r.stderr
    r = run("tcpcopyd", "--config", str(tmp_path / "nope.conf"), *GOOD)
    assert r.returncode == 78 and "no such file" in r.stderr
    cfg.write_text("[tcpcopyd\n")
    r = run("tcpcopyd", "--config", str(cfg), *GOOD)
    assert r.returncode == 78 and str(cfg) in r.stderr


def test_interceptd_needs_service_ports():
    r = run("interceptd")
    assert r.returncode == 2 and "--service-port is required" in r.stderr
    r = run("interceptd", "--service-port", "80,http")
    assert r.returncode == 2 and "'http' is not a port" in r.stderr


@pytest.mark.parametrize("prog", ["tcpcopyd", "interceptd", "tcpcopyctl"])
def test_help_lists_every_flag(prog):
    r = run(prog, "--help")
    assert r.returncode == 0, r.stderr
    if prog != "tcpcopyctl":
        from interceptd.options import REGISTRY as I
        from tcpcopyd.online.options import REGISTRY as T
        for s in (T if prog == "tcpcopyd" else I):
            assert s.flags[-1] in r.stdout, s.name


@pytest.mark.parametrize("prog", ["tcpcopyd", "interceptd"])
def test_the_daemons_refuse_a_processor_whose_store_order_they_do_not_rely_on(
        prog, monkeypatch, capsys):
    import importlib
    import platform
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    main = importlib.import_module({"tcpcopyd": "tcpcopyd.online.main",
                                    "interceptd": "interceptd.main"}[prog]).main
    args = ["--service-port", "80"] if prog == "interceptd" else \
        ["-x", "80-198.18.2.2:80", "-s", "198.18.2.2", "-i", "lo"]
    assert main(args) == 78
    assert "this processor (aarch64) is not supported" in capsys.readouterr().err
