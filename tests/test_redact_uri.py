"""tracking.redact_uri: credentials in tracking URIs (and in text holding them) are masked, nothing else changes."""

from __future__ import annotations

import pytest

from lora_diffusion.tracking import redact_uri


@pytest.mark.parametrize("uri,shown", [
    ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
    ("https://tok@host", "https://***@host"),
    ("https://tok@host:8443/mlflow?x=1", "https://***@host:8443/mlflow?x=1"),
    ("https://bob:s3cret@mlflow.example.org/", "https://bob:***@mlflow.example.org/"),
    ("mysql+pymysql://bob:p@ss:w/rd@db:3306/m", "mysql+pymysql://bob:***@db:3306/m"),  # '@' in the password
    ("https://user:@host", "https://user:***@host"),
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
    ("sqlite:////data/a@b/mlflow.db", "sqlite:////data/a@b/mlflow.db"),  # '@' in a path, not user info
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("file:///tmp/x@y", "file:///tmp/x@y"),
    ("databricks", "databricks"),
    ("uri https://a:b@h1/ and https://t@h2 in text", "uri https://a:***@h1/ and https://***@h2 in text"),
    ("http://h:5000/p@x", "http://h:***@x"),  # ambiguous ('@' in a path after a port): masks more, never less
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # idempotent
