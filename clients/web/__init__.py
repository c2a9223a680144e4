"""The interactive web client: contributor and builder pages over the gRPC services (issue 9).

``clients.web.server.WebServer(addresses).start()`` serves it; every call to the services carries
the signed-in user's own token.
"""

from clients.web.server import WebServer

__all__ = ["WebServer"]
