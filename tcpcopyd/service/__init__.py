"""The service machinery both daemons share, below both of them: the arbiter and the boot
protocol of its workers, the settings registry, reload, logging, sd_notify, capabilities and
the start-up helpers. Nothing here knows tcpcopyd's or interceptd's own modules."""
