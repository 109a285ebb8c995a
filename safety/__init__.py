"""Safety: the watchdog process (``watchdog.py``: daemon restarts, hung-worker kills by per-phase
limits, ``phase_clock.py``), crash reports (``crash.py``, ``crash_scan.py``), the kill markers the
daemon reads (``markers.py``) and ``trainbox health``'s checks (``checkup.py``)."""
