"""Typed settings, loaded once per process from env vars (``FTPS_*``) and command-line flags.

Every service has a ``Settings`` subclass; :func:`load_settings` builds an argparse parser from its
fields so that ``--registry-addr X`` overrides ``FTPS_REGISTRY_ADDR=X`` overrides the default.
"""

from __future__ import annotations

import argparse
import typing
from typing import Sequence, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="CommonSettings")


class StorageSettings(BaseSettings):
    """Where the S3-protocol object store is (MinIO in Kubernetes, moto's server embedded)."""

    model_config = SettingsConfigDict(env_prefix="FTPS_", extra="ignore")

    s3_endpoint: str = Field("127.0.0.1:9000", description="object store host:port")
    s3_access_key: str = Field("ftps", description="object store access key")
    s3_secret_key: str = Field("ftps-secret-key", description="object store secret key")
    s3_bucket: str = Field("ftps", description="bucket holding every object of the deployment")
    s3_secure: bool = Field(False, description="use https to reach the object store")
    s3_region: str = Field("us-east-1", description="object store region")


class CommonSettings(StorageSettings):
    log_level: str = Field("INFO", description="logging level")
    listen: str = Field("127.0.0.1:0", description="host:port to serve on (port 0: any free port)")
    max_message_mb: int = Field(64, description="largest gRPC message accepted or sent, MiB")
    auth_key: str = Field("", description="token signing key (hex or >= 32 chars); empty: see auth_key_file")
    auth_key_file: str = Field("", description="file holding the token signing key; with neither "
                                                "set, auth is OFF and every caller is admin")
    tls_cert_file: str = Field("", description="PEM certificate: serve TLS (and present it as a client for mTLS)")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_ca_file: str = Field("", description="PEM CA bundle: verify peers; with a server certificate, "
                                             "also require client certificates (mutual TLS)")


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
