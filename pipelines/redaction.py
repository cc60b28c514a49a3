"""Credentials out of everything a run shows: stdout, MLflow params, report.json, config.yaml, errors.

A config may carry secrets in URIs — ``http://user:password@mlflow:5000``, a token as the user of
``https://TOKEN@host``, or ``?token=...`` in a query. ``redact`` replaces the secret part with
``***`` and keeps the rest (scheme, host, port, path), so a reader still sees where things went.
What cannot be recovered from the redacted text must be given again: ``forgetless resume`` refuses
a saved config whose values were redacted unless the key is passed anew (or the secret comes from
the environment, e.g. ``MLFLOW_TRACKING_PASSWORD``).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# scheme://userinfo@ — userinfo is user:password (the password goes) or a user alone, which may be
# a token (``https://TOKEN@host``) however short: it goes too. Up to the last @ before the host, so
# a password holding an @ (``user:p@ss@host``) goes whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]+)@")
# ?name=value / &name=value where the name says it holds a secret
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&;#\s]*(?:token|secret|password|passwd|pwd|key|code|signature|sig|credential|auth|session|"
    r"jwt|bearer)[^=&;#\s]*=)(?P<value>[^&;#\s]+)", re.IGNORECASE)
_PLAIN_USERS = frozenset({"git"})  # ssh://git@host: a convention, not a secret


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _password = match.group("userinfo").partition(":")
    if colon:
        return f"{match.group('scheme')}{user}:{REDACTED}@"
    if user in _PLAIN_USERS:
        return match.group(0)
    return f"{match.group('scheme')}{REDACTED}@"


def redact(text: str) -> str:
    """``text`` with the secrets of every URI in it replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_userinfo, text)
    return _SECRET_QUERY.sub(lambda m: m.group("key") + REDACTED, text)


def redact_data(value: Any) -> Any:
    """``redact`` applied to every string inside dicts, lists and tuples (keys included)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v) for v in value)
    return value


def redacted_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``data`` whose string values carry a redacted secret (``***`` where one was)."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found += redacted_keys(value, f"{prefix}{key}.")
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found += redacted_keys(value, f"{prefix}{i}.")
    elif isinstance(data, str) and (f":{REDACTED}@" in data or f"//{REDACTED}@" in data or f"={REDACTED}" in data):
        found.append(prefix.rstrip("."))
    return found
