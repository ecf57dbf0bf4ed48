"""Secrets out of everything the pipeline prints: errors, log lines, metadata.

A URI can carry a credential in two places: its user info (`https://user:password@host`, or a
token as the user name) and its query or fragment (`?token=...`, `&X-Amz-Signature=...`). Both are
replaced by `***` in every URI the pipeline writes into a message; the rest of the URI (scheme,
host, port, path) stays, because that is what tells an operator which server or file is meant.

Values of credential-named environment variables (`HF_TOKEN`, `MLFLOW_TRACKING_PASSWORD`,
`AWS_SECRET_ACCESS_KEY`, ...) and the user info of URIs held in any environment variable are
redacted from free text as well, so a library message that quotes one verbatim is caught too.
"""

from __future__ import annotations

import os
import re
import traceback
from urllib.parse import unquote, urlsplit

REDACTED = "***"

# Query (or fragment) parameters whose value is a credential: matched against the parameter name.
_SECRET_PARAMETER = re.compile(
    r"token|secret|passw|pwd|key|signature|^sig$|credential|auth|session|^code$", re.IGNORECASE
)
_PARAMETER = re.compile(r"(?P<lead>^|[&;#])(?P<name>[^=&;#]+)=(?P<value>[^&;#]*)")
# The authority's user info: everything before the last "@" ahead of the path, query or fragment.
_USER_INFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
# A URI in free text: a scheme, "://", then everything up to whitespace, a quote or a closing bracket.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`)\]}]+")
# Name parts (split on "_") that mark an environment variable as holding a credential.
_SECRET_ENV_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "APIKEY", "CREDENTIAL", "CREDENTIALS"}
# Shorter values ("1", "true", "cpu") would blank out ordinary words wherever they appear.
_MIN_SECRET_LENGTH = 6


def _redact_parameters(text: str) -> str:
    def replace(match: re.Match) -> str:
        if not _SECRET_PARAMETER.search(unquote(match["name"])):
            return match.group(0)
        return f"{match['lead']}{match['name']}={REDACTED}"

    return _PARAMETER.sub(replace, text)


def redact_uri(uri: str) -> str:
    """The URI with its user info and credential-like query/fragment values replaced by `***`.

    Edited in place rather than parsed and rebuilt, so everything else stays byte for byte as written
    (a parse-and-join round trip turns `sqlite:////abs/path` into `sqlite://abs/path`).
    """
    uri = _USER_INFO.sub(rf"\g<scheme>{REDACTED}@", uri)
    cut = min((index for index in (uri.find("?"), uri.find("#")) if index >= 0), default=-1)
    return uri if cut < 0 else uri[: cut + 1] + _redact_parameters(uri[cut + 1 :])


def secret_values(environ: dict[str, str] | None = None) -> set[str]:
    """Credentials held in the environment: credential-named variables, and user info of URIs in any variable.

    Each value is returned as written and percent-decoded, since either form may be quoted back.
    """
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in environ.items():
        if name.upper() != "PWD" and _SECRET_ENV_PARTS & set(name.upper().split("_")):
            found.add(value)
        for uri in _URI_IN_TEXT.findall(value):
            try:
                parts = urlsplit(uri)
            except ValueError:
                continue
            found.update(filter(None, (parts.password, parts.username if parts.password is None else None)))
    return {form for value in found for form in (value, unquote(value)) if len(form) >= _MIN_SECRET_LENGTH}


def redact_text(text: str, environ: dict[str, str] | None = None) -> str:
    """`text` with every URI in it redacted and every credential held in the environment replaced by `***`."""
    text = _URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), text)
    for secret in sorted(secret_values(environ), key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(secret, REDACTED)
    return text


def leaks_secret(error: BaseException) -> bool:
    """Whether printing `error` with its traceback and chained causes would show something `redact_text` hides."""
    text = "".join(traceback.format_exception(error))
    return redact_text(text) != text
