"""The ``trainbox`` command line (``cli/main.py``), the ``trainbox up`` supervisor and the systemd units.

The top layer: it starts every process and may import every package, each inside the command that
needs it, so ``trainbox status`` loads no process package. Nothing imports from here.
"""
