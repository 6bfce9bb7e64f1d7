"""The embedded local stack: Postgres, Redis and an OpenSSH SFTP server on loopback, run as
local processes under the state folder (`.wtc/` by default).

    python -m ops.stack start     # set up what is missing, start it all, bootstrap the databases
    python -m ops.stack status    # what runs, where
    python -m ops.stack stop      # stop the project's processes and the servers, gracefully

`process` holds the plumbing (ports, pidfiles, waiting, stopping), `local` the servers.
"""

from ops.stack.local import Stack, running, scratch_settings, throwaway
from ops.stack.process import Component, StackError, alive, free_port, port_open, wait_until

__all__ = [
    "Component",
    "Stack",
    "StackError",
    "alive",
    "free_port",
    "port_open",
    "running",
    "scratch_settings",
    "throwaway",
    "wait_until",
]
