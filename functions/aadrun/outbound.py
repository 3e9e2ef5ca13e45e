"""The HTTP client session of every outbound call: discovery, JWKS, Graph and MSAL."""
from __future__ import annotations

import requests

from .config import Settings


def client_session(settings: Settings) -> requests.Session:
    """A session that trusts ``settings.ca_file`` when one is given (CONTRACT.md §2).

    requests reads ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE`` by itself but not
    ``SSL_CERT_FILE``; the settings carry whichever of the two the contract names is set.
    """
    session = requests.Session()
    if settings.ca_file:
        session.verify = settings.ca_file
    return session
