"""Every input that does not come from our own code, fed with malformed and random data:
config files and command lines, compare logs for `tcpcopyctl report`, pcap files. Each
either works or is refused in one line; none raises anything else."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interceptd import options as ioptions
from tcpcopyd.online import options
from tcpcopyd.service.settings import EX_CONFIG, EX_USAGE, ConfigError, load

HUGE = "9" * 5000
ODD_VALUES = ["", "-1", "0", HUGE, "-" + HUGE, "1e400", "nan", "inf", "[]", "{}", "true",
              '"\\u0000"', '"\x1b[2J"', '"' + "a" * 3000 + '"', "[1, [2]]", '["", ""]',
              "1979-05-27T07:32:00Z", "0x10", "3.5", '"80-198.18.2.2:99999"']


def _load(prog, registry, layout, path):
    return load(prog, "", registry, ["--config", str(path)], layout)


DAEMONS = [
    ("tcpcopyd", options.REGISTRY, options.LAYOUT,
     '[default]\ntransfer = "80-198.18.2.2:80"\nserver = "198.18.2.2"\ninterface = "lo"\n',
     "default"),
    ("interceptd", ioptions.REGISTRY, ioptions.LAYOUT, "[interceptd]\nservice_port = [80]\n",
     "interceptd"),
]


@pytest.mark.parametrize("prog, registry, layout, base, table", DAEMONS)
def test_every_key_with_odd_values_is_refused_in_one_line_or_taken(tmp_path, prog, registry,
                                                                    layout, base, table):
    refused = 0
    for s in registry:
        for value in ODD_VALUES:
            path = tmp_path / "c.toml"
            path.write_text(base.replace(f"[{table}]\n", f"[{table}]\n{s.name} = {value}\n")
                            if s.name not in base else base)
            try:
                _load(prog, registry, layout, path)
            except ConfigError as e:
                refused += 1
                assert e.code in (EX_CONFIG, EX_USAGE)
                assert "\n" not in str(e)
    assert refused > len(list(registry)) * 5


@pytest.mark.parametrize("flag", ["--timeout", "--workers", "--memory", "--max-lag"])
def test_a_number_of_5000_digits_on_the_command_line_is_a_usage_error(flag):
    with pytest.raises(ConfigError) as e:
        load("tcpcopyd", "", options.REGISTRY,
             ["-x", "80-198.18.2.2:80", "-s", "198.18.2.2", "-i", "lo", flag, HUGE],
             options.LAYOUT)
    assert e.value.code == EX_USAGE


def test_a_toml_integer_of_5000_digits_is_exit_78(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f"[interceptd]\nservice_port = [80]\nqueues = {HUGE}\n")
    with pytest.raises(ConfigError) as e:
        _load("interceptd", ioptions.REGISTRY, ioptions.LAYOUT, path)
    assert e.value.code == EX_CONFIG and str(path) in str(e.value)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_as_a_config_file(tmp_path, data):
    path = tmp_path / "r.toml"
    path.write_bytes(data)
    try:
        _load("interceptd", ioptions.REGISTRY, ioptions.LAYOUT, path)
    except ConfigError as e:
        assert e.code in (EX_CONFIG, EX_USAGE)


# ---------------------------------------------------------------- compare logs
GOOD = {"ts": 1.0, "session": "198.18.1.1:40000", "request": "GET / HTTP/1.1",
        "online": {"status": 200, "bytes": 10, "ttlb_ms": 1.0},
        "target": {"status": 200, "bytes": 10, "ttlb_ms": 2.0}}


def _mutations(rng: random.Random):
    odd = ["x", 1e308, -1.0, -5, None, [], {}, [1], True, "1e400", float("nan"), 2**70,
           "\x1b]0;owned\x07", "a\nb"]
    for _ in range(400):
        rec = json.loads(json.dumps(GOOD))
        for _ in range(rng.randrange(1, 4)):
            where = rec if rng.random() < 0.5 else rec[rng.choice(("online", "target"))]
            if not isinstance(where, dict):
                continue
            key = rng.choice(sorted(where) + ["status", "ttlb_ms", "bytes", "ts"])
            where[key] = rng.choice(odd)
        yield rec


def test_compare_log_records_of_every_wrong_type_never_crash_the_report(tmp_path):
    from tcpcopyd.ctl import report
    rng = random.Random(3)
    lines = [json.dumps(GOOD)] + [json.dumps(r, allow_nan=True) for r in _mutations(rng)]
    lines += ["{", "[]", "null", "1", '"x"', "\x00\xff", json.dumps(GOOD)]
    path = tmp_path / "compare.jsonl"
    path.write_text("\n".join(lines) + "\n", errors="surrogateescape")
    skipped: list[str] = []
    summary = report.summarize(report.read(str(path), skipped), None, skipped)
    text = report.text(summary)
    report.html(summary, "t")
    assert "\x1b" not in text and "\x07" not in text   # no terminal escapes reach the tty
    assert summary["skipped"] > 0


# ---------------------------------------------------------------- the compare rings
def test_compare_rings_drained_are_wiped_and_garbage_in_them_is_counted(tmp_path):
    """Production bytes never reach the segment the status group reads, and do not stay in
    the rings after the master took them; records a worker of this release would not make
    are counted lost, never raised; the log is 0600 whatever the umask."""
    import os

    from tcpcopyd.online import comparelog
    rings = comparelog.Rings(1)
    old = os.umask(0)
    try:
        path = tmp_path / "c.jsonl"
        clog = comparelog.CompareLog(str(path), rings, ("Date",))
        ring = rings.ring(0)
        rng = random.Random(5)
        secret = b"Authorization: Bearer s3cr3t"
        good = {"ts": 1.0, "client": "198.18.1.1:1", "target_address": "198.18.2.2:80",
                "n": 1, "request": "GET / HTTP/1.1\r\n" + secret.decode(),
                "online": {"first": "HTTP/1.1 200 OK\r\n", "size": 5, "ttlb_ms": 1.0},
                "target": None}
        import json as _json
        body = _json.dumps(good).encode()
        records = [comparelog.LENGTH.pack(len(body)) + body]
        records += [rng.randbytes(comparelog.RECORD) for _ in range(50)]
        records += [comparelog.LENGTH.pack(0xFFFF) + rng.randbytes(100),
                    comparelog.LENGTH.pack(4) + b"[1]\0", comparelog.LENGTH.pack(2) + b"{}"]
        ring.push([r.ljust(comparelog.RECORD, b"\0")[:comparelog.RECORD] for r in records])
        assert clog.drain() == 1 and clog.lost == len(records) - 1
        clog.close()
        assert secret not in bytes(rings.mm)
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
