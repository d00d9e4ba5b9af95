"""Mosquitto, run from the files `mosquitto.config.render` wrote; ready once TLS accepts
and it logged that it runs (its signal handlers are in place)."""

from __future__ import annotations

import signal

from meterproof.mosquitto.admin import RUNNING, log_end, logged_after
from meterproof.mosquitto.config import BrokerFiles
from meterproof.stack.process import (
    LOOPBACK,
    SpawnedServer,
    check_ports_free,
    executable,
    port_accepts,
)


class BrokerServer(SpawnedServer):
    """One `mosquitto -c files.conf`, with the pid file and log the config names.

    The config decides the listeners: `port` is the mutual-TLS one, which readiness
    probes; `admin_port` the plain loopback one for operator tools. `stop()` (SIGTERM)
    writes the persistence file first; `kill()` loses what was acknowledged since the last
    autosave.
    """

    program = "mosquitto"

    def __init__(
        self, files: BrokerFiles, *, port: int, admin_port: int, timeout: float = 10.0
    ) -> None:
        super().__init__(log=files.log, pid_file=files.pid, timeout=timeout)
        self.files = files
        #: Named after its folder: `mosquitto`, then `mosquitto-1`... (`stack up --ha`).
        self.name = files.directory.name
        self.port = port
        self.admin_port = admin_port

    @property
    def url(self) -> str:
        return f"mqtts://{LOOPBACK}:{self.port}"

    def start(self) -> float:
        if self.is_running():
            return 0.0
        check_ports_free(self.port, self.admin_port)
        argv = [executable("mosquitto"), "-c", str(self.files.conf)]
        log = self.files.log
        offset = log_end(log)
        return self._launch(
            argv,
            ready=lambda: logged_after(log, offset, RUNNING) and port_accepts(self.port),
            what=f"mosquitto on port {self.port}",
        )

    def kill9(self) -> None:
        """The fault tests' name for `kill()`."""
        self.kill()

    def reload(self) -> None:
        """SIGHUP: re-reads the CRL and ACL for new connections (open ones stay up)."""
        self.send(signal.SIGHUP)

    def pause(self) -> None:
        """SIGSTOP, as when its machine is paused or cut off: nothing dies, no connection
        closes, and nothing is answered (the kernel still takes what fits in the sockets'
        buffers). `resume` lets it go on; `stop` needs it resumed first."""
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)
