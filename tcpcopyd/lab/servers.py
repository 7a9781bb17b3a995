"""Real servers of the lab: nginx and memcached configurations."""
from __future__ import annotations

import os

# nginx access log: one line per request, with what the tests compare
LOG_FORMAT = ("$remote_addr $remote_port $status $request_length $bytes_sent "
              "$request_method $request_uri $request_body_file $msec")


# size of /big.bin served by both nginx
BIG_FILE_SIZE = 50 * 1024 * 1024


# size of /slow.bin (the comparison test's slow answer on the target)
SLOW_FILE_SIZE = 64 * 1024


def nginx_conf(root: str, port: int = 80, workers: int = 1, extra: str = "") -> str:
    """An nginx configuration running in the foreground with everything under ``root``;
    ``extra``: more directives for its server (locations that differ between hosts)."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "www"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    with open(os.path.join(root, "www", "index.html"), "w") as f:
        f.write("hello from the lab\n")
    # a large file for download tests, sparse (no disk used)
    with open(os.path.join(root, "www", "big.bin"), "wb") as f:
        f.truncate(BIG_FILE_SIZE)
    with open(os.path.join(root, "www", "slow.bin"), "wb") as f:
        f.write(b"s" * SLOW_FILE_SIZE)
    return f"""
worker_processes {workers};
user root;  # the lab's files belong to root
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    log_format lab '{LOG_FORMAT}';
    access_log {root}/access.log lab;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    client_max_body_size 1g;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen {port} backlog=8192;
        listen [::]:{port} backlog=8192;
        root {root}/www;
        location = / {{ return 200 "hello from the lab\\n"; }}
        {extra}
        location /upload {{
            # every request body is kept in a file of its own, named in the access log
            client_body_in_file_only on;
            client_body_buffer_size 1m;
            proxy_pass http://127.0.0.1:8081;
        }}
    }}
    server {{
        listen 127.0.0.1:8081;
        access_log off;
        location / {{ return 200 "stored\\n"; }}
    }}
}}
"""


def memcached_args(port: int = 11211) -> list[str]:
    return ["memcached", "-u", "root", "-l", "0.0.0.0,::", "-p", str(port), "-U", "0", "-m", "256",
            "-t", "1", "-c", "16384"]
