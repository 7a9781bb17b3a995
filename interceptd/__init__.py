"""interceptd: target-host side of tcpcopyd (catches and routes the target's replies)."""
