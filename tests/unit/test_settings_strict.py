"""Settings are validated strictly, at start and at reload: addresses, numbers, limits,
cross-checks; an error is one line naming the file, the key and the reason (exit 78), or
the flag (exit 2); a reload that cannot be applied changes nothing and never stops the
master."""
from __future__ import annotations

import logging
import os
import subprocess

import pytest

from interceptd import options as ioptions
from shm import segment as shmseg
from tcpcopyd.lab.lab import command
from tcpcopyd.online import options
from tcpcopyd.service.reload import Reloader
from tcpcopyd.service.settings import EX_CONFIG, EX_USAGE, ConfigError, load

BASE = ["-s", "198.18.2.2", "-i", "lo"]


def conf(tmp_path, text: str) -> str:
    path = tmp_path / "tcpcopyd.conf"
    path.write_text(text)
    return str(path)


def tcpcopyd(tmp_path, body: str):
    path = conf(tmp_path, '[default]\ntransfer = "80-198.18.2.2:80"\nserver = "198.18.2.2"\n'
                          'interface = "lo"\n' + body)
    return load("tcpcopyd", "", options.REGISTRY, ["--config", path], options.LAYOUT)


@pytest.mark.parametrize("rule", ["80-192.168.001.010:80", "80-1.2.3.4.5:80", "80-01.2.3.4:80",
                                  "80-1.2.3:80", "80-256.1.1.1:80"])
def test_addresses_are_strict_dotted_quads(rule):
    with pytest.raises(ConfigError) as e:
        load("tcpcopyd", "", options.REGISTRY, ["-x", rule, *BASE], options.LAYOUT)
    assert e.value.code == EX_USAGE and rule in str(e.value)


@pytest.mark.parametrize("key, value, words", [
    ("timeout", "inf", "expected a number from 1 to 86400"),
    ("timeout", "nan", "expected a number from 1 to 86400"),
    ("memory", "2.5", "expected an integer from 1 to 1048576, not 2.5"),
    ("memory", "1e3", "expected an integer"),
    ("session_slots", "true", "expected an integer"),
    ("workers", '"2.0"', "expected an integer"),
])
def test_numbers_are_finite_and_integers_are_integers(tmp_path, key, value, words):
    with pytest.raises(ConfigError) as e:
        tcpcopyd(tmp_path, f"{key} = {value}\n")
    assert e.value.code == EX_CONFIG
    assert f"[default] {key} = " in str(e.value) and words in str(e.value)


def test_any_number_of_rules_up_to_the_documented_maximum(tmp_path):
    rules = ",".join(f"{1000 + i}-198.18.2.2:{1000 + i}" for i in range(options.MAX_TRANSFERS))
    cfg = load("tcpcopyd", "", options.REGISTRY, ["-x", rules, *BASE], options.LAYOUT)
    assert len(cfg.transfer) == options.MAX_TRANSFERS
    from tcpcopyd.net.capture import BPF_MAXINSNS, bpf_program
    assert len(bpf_program([t.port for t in cfg.transfer])) <= BPF_MAXINSNS
    with pytest.raises(ConfigError, match=rf"{options.MAX_TRANSFERS + 1} rules: at most "
                                          rf"{options.MAX_TRANSFERS}"):
        load("tcpcopyd", "", options.REGISTRY,
             ["-x", rules + ",9-198.18.2.2:9", *BASE], options.LAYOUT)


def test_cross_checks_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[default\] session_slots = 16: 2 workers need at "
                                          r"least 32 \(16 each\)") as e:
        tcpcopyd(tmp_path, "session_slots = 16\nworkers = 2\n")
    assert e.value.code == EX_CONFIG
    with pytest.raises(ConfigError, match=r"--queue-num 65530: with 8 queues the last would "
                                          r"be 65537, above 65535"):
        load("interceptd", "", ioptions.REGISTRY, ["--service-port", "80", "--queue-num",
                                                    "65530", "--queues", "8"], ioptions.LAYOUT)
    with pytest.raises(ConfigError, match="expected an integer from 1 to 64"):
        load("interceptd", "", ioptions.REGISTRY, ["--service-port", "80", "--queues", "257"],
             ioptions.LAYOUT)
    with pytest.raises(ConfigError, match="--ipv6-rules-elsewhere True: only with no_iptables"):
        load("interceptd", "", ioptions.REGISTRY, ["--service-port", "80",
                                                    "--ipv6-rules-elsewhere"], ioptions.LAYOUT)


def test_a_reload_that_cannot_be_applied_changes_nothing_and_the_master_goes_on(tmp_path,
                                                                              caplog):
    path = conf(tmp_path, '[default]\ntransfer = "80-198.18.2.2:80"\nserver = "198.18.2.2"\n'
                          'interface = "lo"\n')
    cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", path], options.LAYOUT)
    seg = shmseg.create(f"test-badreload-{os.getpid()}", 1, 1, 0, 64)
    try:
        reload = Reloader("tcpcopyd", "", options.REGISTRY, options.LAYOUT, cfg, seg)
        reload.publish()

        def broken(values):
            raise RuntimeError("the segment went away")
        seg.write_settings = broken
        with open(path, "a") as f:
            f.write("sample_rate = 20\n")
        with caplog.at_level(logging.ERROR):
            reload()                               # must not raise
        assert "reload failed, the running settings stay" in caplog.text
    finally:
        seg.close()
        seg.unlink()


def run(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*command("tcpcopyd"), *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def test_a_capture_file_is_replayed_only_when_named_as_a_path(tmp_path):
    (tmp_path / "eth9").write_bytes(b"not an interface")
    r = run("-x", "80-198.18.2.2:80", "-s", "198.18.2.2", "-i", "eth9", cwd=str(tmp_path))
    assert r.returncode == 78
    assert "interface 'eth9' does not exist" in r.stderr
    assert "to replay the capture file 'eth9' instead, give -i ./eth9" in r.stderr
    r = run("-x", "80-198.18.2.2:80", "-s", "198.18.2.2", "-i", "./nosuch.pcap",
            cwd=str(tmp_path))
    assert r.returncode == 78 and "-i ./nosuch.pcap: no such capture file" in r.stderr


def test_log_files_are_created_readable_by_their_group_at_most(tmp_path):
    from tcpcopyd.service import logs
    path = tmp_path / "daemon.log"
    old = os.umask(0)
    try:
        logs.setup("tcpcopyd", str(path), "info")
        logging.getLogger("test").info("hello")
    finally:
        os.umask(old)
        logs.setup("tcpcopyd", None, "info")
    assert path.stat().st_mode & 0o777 == 0o640


def test_ipv6_addresses_everywhere_an_address_goes(tmp_path):
    cfg = load("tcpcopyd", "", options.REGISTRY,
               ["-x", "80-198.18.2.2:80,80-[fd18:2:0::2]:80,[FD18:1::2]:8080-[fd18:2::2]:80",
                "-s", "198.18.2.2,[fd18:2::2]:4000,fd18:2::3", "-i", "lo",
                "-c", "198.18.6.x,fd18:9::/120,fd18:9:1::5", "-H", "fd18:1::9"],
               options.LAYOUT)
    assert [str(t) for t in cfg.transfer] == [
        "80-198.18.2.2:80", "80-[fd18:2::2]:80", "[fd18:1::2]:8080-[fd18:2::2]:80"]
    assert [t.ipv6 for t in cfg.transfer] == [False, True, True]
    assert cfg.server == [("198.18.2.2", 36524), ("fd18:2::2", 4000), ("fd18:2::3", 36524)]
    assert cfg.client_pool == ["198.18.6.x", "fd18:9::/120", "fd18:9:1::5"]
    assert cfg.localhost_as == "fd18:1::9"
    from tcpcopyd.online.rewrite import expand_pool
    pool = expand_pool(cfg.client_pool, {"fd18:9::7"})
    assert len(pool) == 254 + 255 - 1 + 1 and all(len(a) in (4, 16) for a in pool)


@pytest.mark.parametrize("flag, value, words", [
    ("-x", "80-fd18:2::2:80", "is not [ONLINE_IP:]PORT-TARGET_IP:TARGET_PORT"),
    ("-x", "80-[fd18:2::g]:80", "is not [ONLINE_IP:]PORT-TARGET_IP:TARGET_PORT"),
    ("-x", "198.18.1.2:80-[fd18:2::2]:80", "different families"),
    ("-x", "80-[fd18:2::2]:80,80-[fd18:2::3]:80", "appear twice"),
    ("-s", "[fd18:2::2", "is not [IPv6]:PORT"),
    ("-c", "fd18:9::/64", "at most a /112"),
    ("-c", "fd18:9::1/120", "host bits zero"),
])
def test_ipv6_addresses_are_strict_too(flag, value, words):
    args = {"-x": "80-198.18.2.2:80", "-s": "198.18.2.2", "-i": "lo", flag: value}
    with pytest.raises(ConfigError) as e:
        load("tcpcopyd", "", options.REGISTRY, [a for kv in args.items() for a in kv],
             options.LAYOUT)
    assert e.value.code == EX_USAGE and words in str(e.value), str(e.value)


def test_interceptd_listens_and_allows_ipv6():
    cfg = load("interceptd", "", ioptions.REGISTRY,
               ["--service-port", "80", "--listen", "::", "--allow", "198.18.0.0/15,fd18::/16"],
               ioptions.LAYOUT)
    assert cfg.listen == "::" and [str(n) for n in cfg.allow] == ["198.18.0.0/15", "fd18::/16"]


def test_the_first_command_form_takes_ipv6_in_brackets():
    rules, fallback = options.seed_form(["[fd18:1::2]:[FD18:1::3]", "80", "fd18:2::2", "8080"])
    assert [str(t) for t in rules["transfer"]] == ["[fd18:1::2]:80-[fd18:2::2]:8080",
                                                   "[fd18:1::3]:80-[fd18:2::2]:8080"]
    assert fallback["server"] == [("fd18:2::2", 36524)]


def test_the_environment_sets_what_the_file_does_flags_override_it(tmp_path, monkeypatch):
    """A container's settings: TCPCOPYD_KEY / INTERCEPTD_KEY, read as the flag's value,
    over the file and under the flags; a bad one names its variable (exit 78)."""
    path = tmp_path / "tcpcopyd.conf"
    path.write_text('[default]\ntransfer = "80-198.18.2.2:80"\nserver = "198.18.2.2"\n'
                    'interface = "lo"\ntimeout = 30\n')
    monkeypatch.setenv("TCPCOPYD_TIMEOUT", "45")
    monkeypatch.setenv("TCPCOPYD_TRANSFER", "81-198.18.2.3:81")
    monkeypatch.setenv("TCPCOPYD_MIRROR", "true")
    cfg = load("tcpcopyd", "", options.REGISTRY, ["--config", str(path), "-x",
                                                  "82-198.18.2.4:82"], options.LAYOUT)
    assert cfg.timeout == 45 and cfg.mirror is True
    assert [t.port for t in cfg.transfer] == [82]            # the flag wins
    monkeypatch.setenv("TCPCOPYD_TIMEOUT", "-3")
    with pytest.raises(ConfigError, match="environment TCPCOPYD_TIMEOUT='-3'") as e:
        load("tcpcopyd", "", options.REGISTRY, ["--config", str(path)], options.LAYOUT)
    assert e.value.code == EX_CONFIG
    monkeypatch.delenv("TCPCOPYD_TIMEOUT")
    monkeypatch.setenv("TCPCOPYD_MIRROR", "maybe")
    with pytest.raises(ConfigError, match="TCPCOPYD_MIRROR='maybe': expected true or false"):
        load("tcpcopyd", "", options.REGISTRY, ["--config", str(path)], options.LAYOUT)
    monkeypatch.delenv("TCPCOPYD_MIRROR")
    monkeypatch.setenv("INTERCEPTD_SERVICE_PORT", "80,11211")
    monkeypatch.setenv("INTERCEPTD_IPV6_RULES_ELSEWHERE", "1")
    # a cross-check names the variable too
    with pytest.raises(ConfigError, match="environment INTERCEPTD_IPV6_RULES_ELSEWHERE=True: "
                                          "only with no_iptables"):
        load("interceptd", "", ioptions.REGISTRY, [], ioptions.LAYOUT)
    monkeypatch.setenv("INTERCEPTD_NO_IPTABLES", "yes")
    icfg = load("interceptd", "", ioptions.REGISTRY, [], ioptions.LAYOUT)
    assert icfg.service_port == [80, 11211] and icfg.no_iptables
