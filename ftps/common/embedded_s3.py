"""An S3-protocol object store on loopback for the embedded default and tests (moto's server).

Kubernetes runs real MinIO; no MinIO server binary installs on our machines. moto keeps objects in
memory and does not verify checksums, which is why :mod:`ftps.common.storage` verifies its own.

moto's stock server guesses the AWS service of every request under one lock (parsing headers and
listing its own modules on disk each time), which serialises concurrent requests: under 50
concurrent contributors that dispatch was most of the store's time. This server speaks S3 only, so
every request goes straight to moto's S3 app.
"""

from __future__ import annotations

import logging
import threading
from typing import Any


def _s3_only_app():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    class S3Only(DomainDispatcherApplication):
        def __init__(self) -> None:
            super().__init__(create_backend_app)
            self._s3 = create_backend_app("s3")

        def get_application(self, environ: dict[str, Any]):
            path = environ.get("PATH_INFO", "")
            if isinstance(path, str) and path.startswith("/moto-api"):
                return super().get_application(environ)
            return self._s3

    return S3Only()


class EmbeddedS3:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.host = host
        self.port = port
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from werkzeug.serving import make_server

        self._server = make_server(self.host, self.port, _s3_only_app(), threaded=True,
                                   request_handler=MotoRequestHandler)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-s3", daemon=True)
        self._thread.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
