"""The watchdog process (heartbeat and progress checks, crash classification): not built yet."""
