#!/bin/sh
# Runs inside the booted guest of tools/boot-test (Debian 12, systemd as PID 1, the built
# packages installed), as a unit after multi-user.target. Writes PASS/FAIL lines to
# /root/guest-checks.out and ends with "GUEST-CHECKS-DONE failures=N".
exec >/root/guest-checks.out 2>&1
failures=0

check() {
    name=$1
    shift
    if "$@"; then
        echo "PASS $name"
    else
        echo "FAIL $name"
        failures=$((failures + 1))
    fi
}

fails() {  # fails COMMAND...: true when COMMAND fails
    ! "$@"
}

# wait_until SECONDS COMMAND...: true once COMMAND succeeds, false after SECONDS
wait_until() {
    limit=$(($1 * 10))
    shift
    i=0
    while [ $i -lt $limit ]; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

json_check() {  # json_check INSTANCE PYTHON-EXPRESSION-ON-d
    tcpcopyctl status --json "$1" | python3 -c "
import json, sys
d = json.load(sys.stdin)[0]
sys.exit(0 if ($2) else 1)"
}

journal_has() {  # journal_has UNIT TEXT
    journalctl -b -u "$1" --no-pager -o cat | grep -qF -- "$2"
}

no_process() {  # no_process TITLE-PREFIX
    ! ps -eo args= | grep -q "^$1"
}

exposure_at_most() {  # exposure_at_most UNIT MAX: systemd-analyze security's overall score
    e=$(systemd-analyze security --no-pager "$1" 2>/dev/null \
        | awk '/Overall exposure level/ {print $(NF-2)}')
    echo "  $1: exposure $e"
    [ -n "$e" ] && awk -v e="$e" -v m="$2" 'BEGIN { exit !(e <= m) }'
}

worker_caps() {  # worker_caps TITLE-PREFIX HEX: the effective capabilities of every worker
    found=0
    for pid in $(ps -eo pid=,args= | awk -v p="$1" \
            '{ pid = $1; sub(/^ *[0-9]+ /, ""); if (index($0, p) == 1) print pid }'); do
        found=1
        caps=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
        echo "  pid $pid ($1): CapEff $caps"
        [ "$caps" = "$2" ] || return 1
    done
    [ $found = 1 ]
}

no_nfqueue_rule() {
    ! iptables -w 5 -S OUTPUT | grep -q NFQUEUE
}

systemctl is-system-running --wait >/dev/null
echo "GUEST-CHECKS-BEGIN state=$(systemctl is-system-running)"
ip -br link

cat >/etc/interceptd.conf <<'EOF'
[interceptd]
service_port = [80]
queues = 2
EOF
cat >/etc/tcpcopyd.conf <<'EOF'
[default]
transfer = "80-198.18.3.2:80"
server = "127.0.0.1"
workers = 2
sample_rate = 100

[eth0]
timeout = 60
EOF

# ---------------------------------------------------------------- interceptd.service
check "interceptd: systemctl start" systemctl start interceptd
check "interceptd: active" systemctl is-active --quiet interceptd
check "interceptd: NFQUEUE rules installed" sh -c 'iptables -w 5 -S OUTPUT | grep -q NFQUEUE'
check "interceptd: master and 2 workers in tcpcopyctl status" \
    json_check interceptd "d['master']['pid'] == $(systemctl show -p MainPID --value interceptd) and len(d['workers']) == 2 and d['healthy']"

# ---------------------------------------------------------------- tcpcopyd@eth0
check "tcpcopyd@eth0: bound to its device (drop-in)" \
    sh -c 'systemctl show -p BindsTo --value tcpcopyd@eth0 | grep -q sys-subsystem-net-devices-eth0.device'
# a container has no udev, hence no device units: the drop-in is masked, as README says
mkdir -p /etc/systemd/system/tcpcopyd@.service.d
ln -s /dev/null /etc/systemd/system/tcpcopyd@.service.d/device.conf
systemctl daemon-reload
check "tcpcopyd@eth0: the device drop-in masked in a container" \
    sh -c '! systemctl show -p BindsTo --value tcpcopyd@eth0 | grep -q device'
check "tcpcopyd@eth0: systemctl start (READY after the workers)" systemctl start tcpcopyd@eth0
check "tcpcopyd@eth0: active" systemctl is-active --quiet tcpcopyd@eth0
MAINPID=$(systemctl show -p MainPID --value tcpcopyd@eth0)
check "tcpcopyd@eth0: master and 2 workers in tcpcopyctl status" \
    json_check tcpcopyd.eth0 "d['master']['pid'] == $MAINPID and len(d['workers']) == 2 and d['healthy']"
check "tcpcopyd@eth0: process titles" sh -c 'ps -eo args= | grep -q "^tcpcopyd: master \[eth0\]" && [ "$(ps -eo args= | grep -c "^tcpcopyd: worker")" = 2 ]'
check "tcpcopyd@eth0: STATUS line" wait_until 15 sh -c 'systemctl show -p StatusText --value tcpcopyd@eth0 | grep -q "2/2 workers; captured"'
check "tcpcopyd@eth0: connected to interceptd" wait_until 15 journal_has tcpcopyd@eth0 "connected to interceptd"
tcpcopyctl status
check "tcpcopyctl status: exit 0 when all healthy" wait_until 15 tcpcopyctl status
GID=$(getent group tcpcopyd | cut -d: -f3)
check "group tcpcopyd made by the package" [ -n "$GID" ]
check "tcpcopyd@eth0: segment readable by the group tcpcopyd" \
    sh -c "[ \"\$(stat -c %g:%a /run/tcpcopyd/tcpcopyd.eth0.shm)\" = $GID:640 ]"
check "tcpcopyctl status: a member of tcpcopyd reads it without root" \
    setpriv --reuid=nobody --regid=nogroup --groups="$GID" tcpcopyctl status
check "tcpcopyctl status: others are told they may not (exit 4)" \
    sh -c 'setpriv --reuid=nobody --regid=nogroup --clear-groups tcpcopyctl status; [ $? = 4 ]'
check "tcpcopyctl metrics: Prometheus text of both daemons" \
    sh -c 'tcpcopyctl metrics | grep -q "^tcpcopyd_state{instance_name=\"tcpcopyd.eth0\",state=\"healthy\"} 1" && tcpcopyctl metrics | grep -q "^interceptd_state{instance_name=\"interceptd\",state=\"healthy\"} 1"'
mkdir -p /var/lib/prometheus/node-exporter
check "tcpcopyd-metrics.service: writes the textfile" \
    sh -c 'systemctl start tcpcopyd-metrics.service && grep -q "^tcpcopyd_sent_total" /var/lib/prometheus/node-exporter/tcpcopyd.prom'
check "tcpcopyd-metrics.timer: a unit of the package" systemctl cat tcpcopyd-metrics.timer
systemctl stop interceptd
check "tcpcopyctl status: down (exit 3) while no interceptd answers" \
    wait_until 15 sh -c 'tcpcopyctl status tcpcopyd.eth0 >/dev/null; [ $? = 3 ]'
systemctl start interceptd
check "tcpcopyctl status: healthy again once interceptd is back" \
    wait_until 30 tcpcopyctl status tcpcopyd.eth0

# ---------------------------------------------------------------- what the packages hold
check "--version on every command" sh -c 'tcpcopyd --version && interceptd --version && tcpcopyctl --version'
check "tcpcopyd runs its compiled per-packet path" sh -c 'tcpcopyd --version | grep -q "per-packet path: compiled"'
check "TCPCOPYD_PURE=1 runs the sources" sh -c 'TCPCOPYD_PURE=1 tcpcopyd --version | grep -q "per-packet path: pure"'
check "man pages installed" sh -c 'for p in man8/tcpcopyd.8 man8/interceptd.8 man8/tcpcopyctl.8 man5/tcpcopyd.conf.5 man5/interceptd.conf.5; do [ -e /usr/share/man/$p.gz ] || exit 1; done'
check "README and BENCHMARKS in /usr/share/doc" sh -c '[ -e /usr/share/doc/tcpcopyd-common/README.md.gz ] && [ -e /usr/share/doc/tcpcopyd-common/BENCHMARKS.md.gz ]'
check "the lab is not installed" sh -c '! python3 -c "import tcpcopyd.lab" 2>/dev/null'
check "logrotate files installed" sh -c '[ -e /etc/logrotate.d/tcpcopyd ] && [ -e /etc/logrotate.d/interceptd ]'
check "autopkgtest smoke test" /usr/local/bin/autopkgtest-smoke

# ---------------------------------------------------------------- least privilege
check "tcpcopyd@eth0: systemd-analyze security exposure at most 3.0" exposure_at_most tcpcopyd@eth0.service 3.0
check "interceptd: systemd-analyze security exposure at most 3.0" exposure_at_most interceptd.service 3.0
check "tcpcopyd@eth0: workers keep no capability" worker_caps "tcpcopyd: worker" 0000000000000000
check "interceptd: workers keep CAP_NET_ADMIN only" worker_caps "interceptd: worker" 0000000000001000
check "tcpcopyd@eth0: memory limited" sh -c '[ "$(systemctl show -p MemoryMax --value tcpcopyd@eth0)" != infinity ]'

# ---------------------------------------------------------------- reload
sed -i 's/^sample_rate = 100/sample_rate = 20/; s/^timeout = 60/timeout = 60\nmtu = 1400/' /etc/tcpcopyd.conf
check "reload: systemctl reload" systemctl reload tcpcopyd@eth0
check "reload: sample_rate 20 published" wait_until 10 json_check tcpcopyd.eth0 "d['settings']['sample_rate'] == 20"
check "reload: both workers applied it" wait_until 10 sh -c '[ "$(journalctl -b -u tcpcopyd@eth0 -o cat | grep -c "worker applied the reloaded settings: sample_rate=20%")" = 2 ]'
check "reload: mtu named as needing a restart" journal_has tcpcopyd@eth0 "changed but needs a restart to apply: mtu"
check "reload: same master" [ "$(systemctl show -p MainPID --value tcpcopyd@eth0)" = "$MAINPID" ]
echo 'sample_rate = "lots"' >>/etc/tcpcopyd.conf
systemctl reload tcpcopyd@eth0
check "reload: a bad file changes nothing" wait_until 10 journal_has tcpcopyd@eth0 "reload failed, the running settings stay: /etc/tcpcopyd.conf: [eth0] sample_rate = 'lots'"
check "reload: still active after a bad file" systemctl is-active --quiet tcpcopyd@eth0
sed -i '$d' /etc/tcpcopyd.conf

# ---------------------------------------------------------------- upgrade
check "upgrade: configs are conffiles" sh -c 'dpkg-query -W -f="\${Conffiles}" tcpcopyd | grep -q "/etc/tcpcopyd.conf " && dpkg-query -W -f="\${Conffiles}" interceptd | grep -q "/etc/interceptd.conf "'
IPID=$(systemctl show -p MainPID --value interceptd)
# the packages the guest was made with (tools/boot-test put them in /root/debs)
check "upgrade: the packages reinstall over themselves" \
    sh -c 'dpkg -i /root/debs/tcpcopyd_*.deb /root/debs/interceptd_*.deb >/root/upgrade.log 2>&1 || { cat /root/upgrade.log; false; }'
check "upgrade: tcpcopyd@eth0 restarted" wait_until 20 sh -c "systemctl is-active --quiet tcpcopyd@eth0 && [ \"\$(systemctl show -p MainPID --value tcpcopyd@eth0)\" != $MAINPID ]"
check "upgrade: interceptd restarted" wait_until 20 sh -c "systemctl is-active --quiet interceptd && [ \"\$(systemctl show -p MainPID --value interceptd)\" != $IPID ]"
check "upgrade: the edited config stays" grep -q "^sample_rate = 20" /etc/tcpcopyd.conf
MAINPID=$(systemctl show -p MainPID --value tcpcopyd@eth0)

# ---------------------------------------------------------------- log file and SIGUSR1
systemctl kill -s USR1 tcpcopyd@eth0
check "SIGUSR1: service survives" systemctl is-active --quiet tcpcopyd@eth0

# ---------------------------------------------------------------- stop
check "tcpcopyd@eth0: systemctl stop" systemctl stop tcpcopyd@eth0
check "tcpcopyd@eth0: no process left" no_process "tcpcopyd:"
check "tcpcopyd@eth0: no shm segment left" [ ! -e /run/tcpcopyd/tcpcopyd.eth0.shm ]
check "tcpcopyd@eth0: stopped cleanly" [ "$(systemctl show -p Result --value tcpcopyd@eth0)" = success ]
check "interceptd: systemctl stop" systemctl stop interceptd
check "interceptd: no process left" no_process "interceptd:"
check "interceptd: no NFQUEUE rule left" no_nfqueue_rule
check "interceptd: its guard stays after the stop" sh -c 'iptables -w 5 -S OUTPUT | grep -q "interceptd-guard:interceptd.*DROP"'
check "interceptd: no shm segment left" [ ! -e /run/tcpcopyd/interceptd.shm ]

# ---------------------------------------------------------------- failures
check "tcpcopyd@nosuch0: start fails" fails systemctl start tcpcopyd@nosuch0
check "tcpcopyd@nosuch0: clear message" journal_has tcpcopyd@nosuch0 "tcpcopyd: interface 'nosuch0' does not exist"
check "tcpcopyd@nosuch0: exit 78, no restart loop" sh -c '[ "$(systemctl show -p ExecMainStatus --value tcpcopyd@nosuch0)" = 78 ] && [ "$(systemctl show -p NRestarts --value tcpcopyd@nosuch0)" = 0 ]'
echo 'frobnicate = 1' >>/etc/tcpcopyd.conf
check "bad config: start fails" fails systemctl start tcpcopyd@eth0
check "bad config: file, key and reason" journal_has tcpcopyd@eth0 "tcpcopyd: /etc/tcpcopyd.conf: [eth0] frobnicate: unknown key"
check "bad config: nothing started" no_process "tcpcopyd:"

# ---------------------------------------------------------------- purge
sed -i '$d' /etc/tcpcopyd.conf
echo 'log = "/var/log/tcpcopyd/eth0.log"' >>/etc/tcpcopyd.conf
check "log file: tcpcopyd@eth0 starts with log = FILE" systemctl start tcpcopyd@eth0
check "log file: written under LogsDirectory" wait_until 10 grep -q "ready: 2 worker" /var/log/tcpcopyd/eth0.log
systemctl start interceptd
check "purge: dpkg --purge tcpcopyd interceptd" sh -c 'dpkg --purge tcpcopyd interceptd >/root/purge.log 2>&1'
check "purge: no process left" sh -c '! ps -eo args= | grep -q "^tcpcopyd:\|^interceptd:"'
check "purge: no rule, no guard, no shm segment left" sh -c '! iptables -w 5 -S OUTPUT | grep -q "NFQUEUE\|interceptd-guard" && ! ls /run/tcpcopyd | grep -q "\.shm$"'
check "purge: config files and logs gone" sh -c '[ ! -e /etc/tcpcopyd.conf ] && [ ! -e /etc/interceptd.conf ] && [ ! -e /var/log/tcpcopyd ]'

echo "--- tcpcopyd@eth0, first lines"
journalctl -b -u tcpcopyd@eth0 --no-pager -o short-monotonic | head -40
echo "--- journal"
journalctl -b -u interceptd -u 'tcpcopyd@*' --no-pager -o short-monotonic | tail -80
echo "GUEST-CHECKS-DONE failures=$failures"
