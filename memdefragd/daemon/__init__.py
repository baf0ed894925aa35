"""The running daemon: main loop, signals, systemd integration and logging."""
