"""Typed settings, loaded once per process from env vars (``FTPS_*``) and command-line flags.

Every service has a ``Settings`` subclass; :func:`load_settings` builds an argparse parser from its
fields so that ``--registry-addr X`` overrides ``FTPS_REGISTRY_ADDR=X`` overrides the default.
"""

from __future__ import annotations

import argparse
import typing
from typing import Literal, Sequence, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="CommonSettings")


class StorageSettings(BaseSettings):
    """Where the S3-protocol object store is (MinIO in Kubernetes, moto's server embedded)."""

    model_config = SettingsConfigDict(env_prefix="FTPS_", extra="ignore")

    s3_endpoint: str = Field("127.0.0.1:9000", description="object store host:port (S3 protocol), or "
                             "file:///abs/folder: blobs as files in that folder (one machine)")
    s3_access_key: str = Field("ftps", description="object store access key")
    s3_secret_key: str = Field("ftps-secret-key", description="object store secret key")
    s3_bucket: str = Field("ftps", description="bucket holding every object of the deployment")
    s3_secure: bool = Field(False, description="use https to reach the object store")
    s3_region: str = Field("us-east-1", description="object store region")


class DatabaseSettings(BaseSettings):
    """Where a stateful service's metadata lives (registry, gateway, scorer): ftps.common.db."""

    model_config = SettingsConfigDict(env_prefix="FTPS_", extra="ignore")

    database_url: str = Field("", description="SQLAlchemy URL of this service's metadata database: "
                              "sqlite:///path/file.db (embedded) or postgresql+psycopg://user:pw@host/db; "
                              "required")
    db_migrate: bool = Field(True, description="apply this service's database migrations at start; false: "
                             "only serve a schema already at the code's version (a migration Job applies them)")
    migrate_only: bool = Field(False, description="apply this service's database migrations, then exit "
                               "(the Kubernetes migration Job)")


class CommonSettings(StorageSettings):
    log_level: str = Field("INFO", description="logging level")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or json: one JSON "
                                                "object per line (time, level, logger, message, trace_id, "
                                                "span_id, service)")
    listen: str = Field("127.0.0.1:0", description="host:port to serve on (port 0: any free port)")
    max_message_mb: int = Field(64, description="largest gRPC message accepted or sent, MiB")
    auth_key: str = Field("", description="token signing key (hex or >= 32 chars); empty: see auth_key_file")
    auth_key_file: str = Field("", description="file holding the token signing key; with neither "
                                                "set the service refuses to start (unless auth_disabled)")
    auth_disabled: bool = Field(False, description="serve WITHOUT authentication: every caller is admin "
                                "'auth-disabled' (local experiments only; no signing key may be set)")
    tls_cert_file: str = Field("", description="PEM certificate: serve TLS (and present it as a client for mTLS)")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_ca_file: str = Field("", description="PEM CA bundle: verify peers; with a server certificate, "
                                             "also require client certificates (mutual TLS)")
    # Bounded work per caller (ftps.common.limits): one caller must not hold every thread.
    max_concurrent_rpcs: int = Field(64, ge=1, description="calls this service runs at once, streams "
                                     "included; one more is refused at once (RESOURCE_EXHAUSTED). Health "
                                     "checks have threads of their own besides")
    max_streams_per_principal: int = Field(8, ge=1, description="streams one caller (token subject; without "
                                           "one, client address) may hold open on this service; one more is "
                                           "RESOURCE_EXHAUSTED with retry advice. Services' own calls are not capped")
    stream_idle_s: float = Field(300.0, ge=0, description="the server ends a stream that moved no message "
                                 "this long, seconds (status OK, trailer ftps-stream-end: idle; clients "
                                 "re-watch); 0: never")
    stream_max_s: float = Field(3600.0, ge=0, description="the server ends a stream that has lived this "
                                "long, seconds (trailer ftps-stream-end: max-lifetime); 0: never")
    metrics_listen: str = Field("", description="host:port of the Prometheus metrics endpoint (/metrics; "
                                "port 0: any free port); empty: no metrics endpoint")


def load_settings(cls: type[S], argv: Sequence[str] | None = None, *, prog: str | None = None,
                  description: str | None = None) -> S:
    """Parse flags derived from ``cls``'s fields; unset flags fall back to env vars, then defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "FTPS_" + name.upper()
        help_ = f"{field.description or name} (env {env}; default {field.default!r})"
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return cls(**overrides)


def _is_bool(annotation: object) -> bool:
    return annotation is bool or (typing.get_origin(annotation) is typing.Union
                                  and bool in typing.get_args(annotation))
