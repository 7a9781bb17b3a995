"""tcpcopyd: live TCP traffic replication, online-host side."""
