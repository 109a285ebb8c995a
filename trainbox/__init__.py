"""trainbox: the shared foundations (home layout, config, atomic files, status, control and job-spec
formats, the spool's naming and layout, role loop contract).

Foundations only: every process package (daemon, core, safety, management, monitoring, cli) imports
from here; nothing here imports from them (tests/test_layers.py), so every process can start without
pulling in the others.
"""

__version__ = "0.1.0"
