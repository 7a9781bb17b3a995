"""The config file: every key round-trips, tables override in order, bad files exit 78 with
file, key and reason; the docs generated from the registry are current; reloads."""
from __future__ import annotations

import logging
import os
import subprocess

import pytest

from interceptd import options as imain
from shm import segment as shmseg
from tcpcopyd.ctl import docs
from tcpcopyd.lab.lab import command
from tcpcopyd.online import options
from tcpcopyd.service import logs
from tcpcopyd.service.reload import Reloader, SettingsWatch
from tcpcopyd.service.settings import EX_CONFIG, EX_USAGE, ConfigError, load

TCPCOPYD = ("tcpcopyd", options.REGISTRY, options.LAYOUT, "default")
INTERCEPTD = ("interceptd", imain.REGISTRY, imain.LAYOUT, "interceptd")
REQUIRED = {"tcpcopyd": {"transfer": '"80-198.18.2.2:80"', "server": '"198.18.2.2"',
                         "interface": '"lo"'},
            "interceptd": {"service_port": "[80]"}}


def write(tmp_path, text: str):
    path = tmp_path / "tcpcopyd.conf"
    path.write_text(text)
    return str(path)


def conf(kind: str, table: str, **keys: str) -> str:
    body = {**REQUIRED[kind], **keys}
    return f"[{table}]\n" + "".join(f"{k} = {v}\n" for k, v in body.items())


def cli_form(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


@pytest.mark.parametrize("daemon", [TCPCOPYD, INTERCEPTD], ids=lambda d: d[0])
def test_every_key_round_trips_and_matches_its_flag(tmp_path, daemon):
    prog, registry, layout, table = daemon
    for s in registry:
        assert s.example is not None, f"{s.name} has no example"
        path = write(tmp_path, conf(prog, table, **{s.name: docs.toml_value(s.example)}))
        cfg = load(prog, "", registry, ["--config", path], layout)
        assert cfg.values[s.name] == s.parse(s.example), s.name
        assert cfg.source[s.name] == f"{path} [{table}]"
        if not s.is_flag:
            by_flag = load(prog, "", registry, ["--config", path, s.flags[-1],
                                                cli_form(s.example)], layout)
            assert by_flag.values[s.name] == cfg.values[s.name], s.name
            assert by_flag.source[s.name] == "cli"


def test_interface_table_overrides_default_and_flags_override_both(tmp_path):
    path = write(tmp_path, conf("tcpcopyd", "default", sample_rate="50", timeout="30",
                                interface='"eth0"')
                 + "[eth0]\nsample_rate = 20\n[eth1]\nsample_rate = 70\n")
    cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", path], options.LAYOUT)
    assert (cfg.interface, cfg.sample_rate, cfg.timeout) == ("eth0", 20, 30.0)
    cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", path, "-i", "eth1"],
               options.LAYOUT)
    assert (cfg.interface, cfg.sample_rate) == ("eth1", 70)
    cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", path, "-i", "eth1", "-r", "5"],
               options.LAYOUT)
    assert cfg.sample_rate == 5


@pytest.mark.parametrize("text, message", [
    ('[default]\nmtu = "big"\n', "[default] mtu = 'big': expected an integer from 576 to 65535"),
    ("[default]\nmtu = true\n", "[default] mtu = True: expected an integer"),
    ("[eth7]\nsample_rate = 101\n", "[eth7] sample_rate = 101: expected an integer from 1"),
    ("[default]\nsample-rate = 5\n", "[default] sample-rate: unknown key (did you mean "
                                     "sample_rate?)"),
    ("[default]\nfrobnicate = 1\n", "[default] frobnicate: unknown key"),
    ('transfer = "80-198.18.2.2:80"\n', "transfer = '80-198.18.2.2:80': settings belong in a "
                                        "table"),
    ("[default]\nmtu = 1500\nmtu = 1400\n", "not valid TOML"),
    ("[default\n", "not valid TOML"),
    ("[default]\n", "transfer is not set (put it in [default] or give -x)"),
    ("[default]\n[default.x]\n", "[default] x: unknown key"),
])
def test_bad_file_names_file_key_and_reason(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load("tcpcopyd", "", options.REGISTRY, ["--config", path], options.LAYOUT)
    assert e.value.code == EX_CONFIG
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_interceptd_ignores_tcpcopyd_tables_and_the_other_way_round(tmp_path):
    path = write(tmp_path, conf("tcpcopyd", "default")
                 + "[interceptd]\nservice_port = [80, 11211]\nqueues = 1\n")
    assert load("tcpcopyd", "", options.REGISTRY, ["--config", path],
                options.LAYOUT).transfer[0].port == 80
    assert load("interceptd", "", imain.REGISTRY, ["--config", path],
                imain.LAYOUT).service_port == [80, 11211]


def test_missing_file_and_directory(tmp_path):
    for path, why in ((str(tmp_path / "nope.conf"), "no such file"),
                      (str(tmp_path), "is a directory")):
        with pytest.raises(ConfigError) as e:
            load("interceptd", "", imain.REGISTRY, ["--config", path], imain.LAYOUT)
        assert e.value.code == EX_CONFIG and str(e.value) == f"{path}: {why}" + (
            "" if why == "no such file" else ", not a config file")


def test_bad_flag_value_is_a_usage_error():
    with pytest.raises(ConfigError) as e:
        load("tcpcopyd", "", options.REGISTRY, ["-x", "80-198.18.2.2:80", "-s", "198.18.2.2",
                                                "-i", "lo", "-r", "0"], options.LAYOUT)
    assert e.value.code == EX_USAGE and str(e.value) == "-r '0': expected an integer from 1 " \
                                                        "to 100"


@pytest.mark.parametrize("prog", ["tcpcopyd", "interceptd"])
def test_daemon_exits_78_and_starts_nothing(tmp_path, prog):
    path = write(tmp_path, "[default]\nmtu = 'big'\n[interceptd]\nqueues = 0\n")
    before = set(shmseg.list_segments(""))
    r = subprocess.run([*command(prog), "--config", path], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 78
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"{prog}: {path}: [")
    assert set(shmseg.list_segments("")) == before


def test_generated_docs_and_config_files_are_current():
    stale = [str(p) for p, text in docs.generated().items() if p.read_text() != text]
    assert not stale, f"run `python -m tcpcopyd.ctl.docs` to update {stale}"


def test_shipped_config_files_parse_and_name_every_key():
    import tomllib
    for path, registry in ((docs.ROOT / "etc/tcpcopyd.conf", options.REGISTRY),
                           (docs.ROOT / "etc/interceptd.conf", imain.REGISTRY)):
        text = path.read_text()
        tomllib.loads(text)
        for s in registry:
            assert f"\n# {s.name} = " in text, (path, s.name)


def test_reload_applies_live_settings_and_names_the_rest(tmp_path, caplog):
    path = write(tmp_path, conf("tcpcopyd", "default", sample_rate="100"))
    cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", path], options.LAYOUT)
    seg = shmseg.create(f"test-reload-{os.getpid()}", 1, 1, 0, 64)
    try:
        reload = Reloader("tcpcopyd", "", options.REGISTRY, options.LAYOUT, cfg, seg,
                          lambda _old, _new: [])
        reload.publish()
        watch = SettingsWatch("tcpcopyd", seg, load("tcpcopyd", "", options.REGISTRY,
                                                    ["--config", path], options.LAYOUT))
        assert watch.poll() is None
        write(tmp_path, conf("tcpcopyd", "default", sample_rate="20", mtu="1400"))
        with caplog.at_level(logging.INFO):
            reload()
        assert cfg.sample_rate == 20 and cfg.mtu == 1500
        assert seg.read_settings()["sample_rate"] == 20
        assert "changed but needs a restart to apply: mtu" in caplog.text
        assert watch.poll()["sample_rate"] == 20 and watch.cfg.sample_rate == 20
        assert watch.poll() is None
        write(tmp_path, "[default]\nsample_rate = 'x'\n")
        reload()
        assert cfg.sample_rate == 20 and "the running settings stay" in caplog.text
    finally:
        seg.close()
        seg.unlink()


def test_repeated_errors_are_rate_limited():
    now = [0.0]
    limit = logs.RateLimit(burst=3, window=10, clock=lambda: now[0])

    def rec(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("x", level, __file__, 1, msg, None, None)

    passed = [limit.filter(rec("send failed: %s")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(rec("another error"))
    assert all(limit.filter(rec("info", logging.INFO)) for _ in range(10))
    now[0] = 10.5
    r = rec("send failed: %s")
    assert limit.filter(r) and "[7 more like this held back in the last 10s]" in r.msg


def test_sampling_is_a_stable_share_of_client_ports():
    from tcpcopyd.online.engine import sampled
    src = bytes([198, 18, 1, 1])
    picked = [p for p in range(1024, 21024) if sampled(src, p, 20)]
    assert 0.18 < len(picked) / 20000 < 0.22
    assert picked == [p for p in range(1024, 21024) if sampled(src, p, 20)]
    assert all(sampled(src, p, 100) for p in range(1024, 2048))


def test_a_reload_may_retarget_ports_and_rebind_online_addresses_not_capture_new_ones():
    from tcpcopyd.online.main import not_live
    base = ["-s", "198.18.2.2", "-i", "lo", "-x"]

    def cfg(rules: str):
        return load("tcpcopyd", "", options.REGISTRY, [*base, rules], options.LAYOUT)
    assert not_live(cfg("80-198.18.2.2:80"), cfg("80-198.18.2.3:8080")) == []
    assert not_live(cfg("80-198.18.2.2:80"), cfg("81-198.18.2.2:80")) == ["transfer"]
    # other online addresses for the same port: live (a node's pods come and go)
    assert not_live(cfg("198.18.1.2:80-198.18.2.2:80"),
                    cfg("198.18.1.7:80-198.18.2.2:80,198.18.1.8:80-198.18.2.2:80")) == []
    # the first IPv6 rule: the capture sockets take IPv4 only until a restart
    assert not_live(cfg("80-198.18.2.2:80"),
                    cfg("80-198.18.2.2:80,80-[fd18:2::2]:80")) == ["transfer"]


def test_settings_keep_their_types_across_a_reload_in_master_and_workers(tmp_path):
    path = write(tmp_path, conf("tcpcopyd", "default", timeout="30"))
    cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", path], options.LAYOUT)
    assert isinstance(cfg, options.Settings)
    seg = shmseg.create(f"test-typed-{os.getpid()}", 1, 1, 0, 64)
    try:
        reload = Reloader("tcpcopyd", "", options.REGISTRY, options.LAYOUT, cfg, seg)
        reload.publish()
        worker_cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", path],
                          options.LAYOUT)
        watch = SettingsWatch("tcpcopyd", seg, worker_cfg)
        write(tmp_path, conf("tcpcopyd", "default", timeout="45",
                             transfer='"80-198.18.2.3:8080"', keepalive_timeout="7"))
        reload()
        assert watch.poll() is not None
        for c in (cfg, worker_cfg):
            assert c.transfer == [options.Transfer(None, 80, "198.18.2.3", 8080)]
            assert isinstance(c.timeout, float) and c.timeout == 45.0
            assert c.keepalive_timeout == 7.0 and c.log is None
        assert seg.read_settings()["transfer"] == ["80-198.18.2.3:8080"]
    finally:
        seg.close()
        seg.unlink()
