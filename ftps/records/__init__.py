"""Records: the one home of what a labelled record is, how it is checked and the files it comes in.

- :mod:`ftps.records.checks`: ``validate`` (records inside the services: finite float32 x, int64 y,
  raising :class:`RecordsError`) and ``for_task`` (records arriving from outside, against a task's
  settings and schema, raising ``InvalidArgument`` naming the field and the first bad index);
- :mod:`ftps.records.npz`: the npz format records travel in between services (``save``/``load``,
  :class:`~ftps.records.npz.Records` keeping the blob it was read from) and the npz a person hands
  a client (with optional record ids);
- :mod:`ftps.records.images`: folders of images with a ``labels.csv``;
- :mod:`ftps.records.tabular`: a tabular task's schema, raw rows checked and encoded;
- :mod:`ftps.records.tables`: CSV and Parquet files read into columns, bounded;
- :mod:`ftps.records.files`: every format a client accepts -> records for a task.

No torch and no grpc here: the gateway, the registry, the worker's parent process and the clients
all import it.
"""

from __future__ import annotations


class RecordsError(ValueError):
    """Records inside the services (x, y) are malformed or do not fit the model."""


__all__ = ["RecordsError"]
