"""The composition root: the embedded stack (all four services in one process, or one process each),
the end-to-end demo and the ``ftps-stack`` command. It imports the library, the services and the
clients; nothing imports it (tests/test_layout.py)."""
