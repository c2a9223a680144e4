"""Shared internals of every FT-PrivacyScore service: settings, logging, gRPC plumbing, object
storage, serde and the error hierarchy. Services import these; nothing is copied between them."""
