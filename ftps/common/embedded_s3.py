"""An S3-protocol object store on loopback for the embedded default and tests (moto's server).

Kubernetes runs real MinIO; no MinIO server binary installs on our machines. moto keeps objects in
memory and does not verify checksums, which is why :mod:`ftps.common.storage` verifies its own.
"""

from __future__ import annotations

import logging


class EmbeddedS3:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        from moto.server import ThreadedMotoServer  # heavy import, only when embedded

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.host = host
        self.port = port

    def start(self) -> str:
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.stop()
