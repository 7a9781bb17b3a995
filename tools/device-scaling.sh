#!/bin/bash
# Worker-pool scaling on the lent many-core machine (see ../shared/recipes/DEVICE.md): it has
# no registry, so everything comes in .devcarry/ (ignored by git): Debian .debs of nginx,
# h2load, iptables and their libraries, unpacked into /tmp/x (never into /), and cp312
# wheels of our dependencies. Prepare .devcarry here, then run this script there once:
#   echo /.devcarry/ >> .git/info/exclude; mkdir -p .devcarry/debs .devcarry/whl
#   (cd .devcarry/debs && apt-get download nginx nghttp2-client libnghttp2-14 libev4 \
#     libjemalloc2 iptables libxtables12 libip4tc2 libip6tc2 libnftnl11 libmnl0 \
#     libnetfilter-conntrack3 libnfnetlink0 libnetfilter-queue1 libjansson4 iproute2 \
#     libbpf1 libelf1 libcap2 libtirpc3 libtirpc-common libdb5.3)
#   python3.12 -m pip wheel --no-deps -w .devcarry/whl NetfilterQueue   # needs gcc + headers
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
#     -d .devcarry/whl orjson setproctitle psutil pyroute2 dpkt
# and call it with carry [".devcarry"].
set -u
exec 2>&1
X=/tmp/x
mkdir -p $X /tmp/bin
for f in .devcarry/debs/*.deb; do dpkg -x "$f" $X; done
export LD_LIBRARY_PATH=$X/usr/lib/x86_64-linux-gnu:$X/lib/x86_64-linux-gnu
export XTABLES_LIBDIR=$X/usr/lib/x86_64-linux-gnu/xtables
printf '#!/bin/sh\nexec %s/usr/sbin/xtables-nft-multi iptables "$@"\n' $X > /tmp/bin/iptables
chmod +x /tmp/bin/iptables
export PATH=/tmp/bin:$PATH:$X/usr/sbin:$X/usr/bin:$X/bin:$X/sbin
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
modprobe -q nfnetlink_queue 2>/dev/null; modprobe -q xt_NFQUEUE 2>/dev/null
echo "== $(nproc) cpus, $(python3 -V), $(nginx -v 2>&1), $(h2load --version | head -1)"
iptables -V
python3 -c "import netfilterqueue, pyroute2, psutil, orjson, setproctitle; print('imports ok')" \
    || exit 1
RATES=${RATES:-10000,20000,40000}
WORKERS=${WORKERS:-1,2,4,8}
python3 -u -m tcpcopyd.lab.bench --rates "$RATES" --workers "$WORKERS" --runs "${RUNS:-1}" \
    --requests "${REQUESTS:-100000}" --threads "${THREADS:-8}" --nginx-workers 4 --settle "${SETTLE:-5}" \
    --tcpcopyd-cpus "${TCPCOPYD_CPUS:-0-7}" --interceptd-cpus "${INTERCEPTD_CPUS:-8-15}" \
    | tee "${OUT:-/tmp}/scaling.txt"
