"""Secrets out of error texts before they are stored or shown: a CloudStack connection error carried the
apiKey and a signed, replayable request URL into a job error every viewer could read."""

from __future__ import annotations

import re

REDACTED = "[redacted]"
# A URL's query string (CloudStack signs every parameter into it; a VMA URL may carry a token).
_URL_QUERY = re.compile(r"((?:https?|wss?|nbds?)://[^\s?#'\"<>]*)\?[^\s'\"<>]*", re.IGNORECASE)
# key=value and "key": "value" for the names that hold credentials.
_CREDENTIAL_NAMES = r"api_?key|secret_?key|secret|signature|token|password|passwd|session_?key|tls-psk-file|psk"
_KEY_VALUE = re.compile(rf"\b({_CREDENTIAL_NAMES})(['\"]?\s*[=:]\s*)(['\"]?)[^\s&'\",;)]+", re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def scrub(text: str) -> str:
    """``text`` with query strings, credential values and bearer tokens replaced by [redacted]."""
    if not text:
        return text
    text = _URL_QUERY.sub(rf"\1?{REDACTED}", text)
    text = _KEY_VALUE.sub(rf"\1\2\3{REDACTED}", text)
    return _BEARER.sub(rf"\1 {REDACTED}", text)
