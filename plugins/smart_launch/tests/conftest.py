"""What the smart_launch tests share: the EHR simulator and a hub that trusts it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))

from ehr_simulator import Client, EhrSimulator  # noqa: E402

CLIENT_ID = "emix-hub"
SECRET = "s3cret-for-tests-only"


@pytest.fixture
def ehr() -> Iterator[EhrSimulator]:
    """A running EHR simulator; emix registered as a confidential client (client secret)."""
    sim = EhrSimulator().start()
    sim.register(Client(CLIENT_ID, "http://127.0.0.1:8480/smart/callback", secret=SECRET))
    try:
        yield sim
    finally:
        sim.stop()


def smart_table(ehr: EhrSimulator, **settings: Any) -> str:
    """A ``[smart]`` table trusting the simulator (extra settings override)."""
    values: dict[str, Any] = {
        "allowed_issuers": [ehr.fhir_base],
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "frame_ancestors": [ehr.base],
        **settings,
    }
    # the simulator's clinicians are lakeside's
    values.setdefault("issuer_facilities", {i: ["lakeside"] for i in values["allowed_issuers"]})
    lines = ["[smart]"]
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, dict):
            pairs = (f"{k!r} = [{', '.join(repr(v) for v in vs)}]" for k, vs in value.items())
            lines.append(f"{key} = {{ {', '.join(pairs)} }}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v) for v in value)}]")
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines).replace("'", '"') + "\n"


def configure(home: Path, ehr: EhrSimulator, **settings: Any) -> None:
    """Write the hub's ``[smart]`` table (read on each request: no restart needed)."""
    config = home / "emix.toml"
    text = config.read_text().split("[smart]")[0]
    config.write_text(text + "\n" + smart_table(ehr, **settings))


class Launch:
    """One browser's launch, driven through a Flask test client and the real simulator."""

    def __init__(self, client: Any, ehr: EhrSimulator) -> None:
        self.client = client
        self.ehr = ehr
        self.authorize_url = ""
        self.callback_url = ""

    def start(self, query: str) -> Any:
        answer = self.client.get(f"/smart/launch?{query}")
        if answer.status_code == 302:
            self.authorize_url = answer.headers["Location"]
        return answer

    def authorize(self) -> str:
        """The EHR's answer to the authorization request: the callback URL (code, state)."""
        answer = requests.get(self.authorize_url, allow_redirects=False, timeout=10)
        assert answer.status_code == 302, answer.text
        self.callback_url = answer.headers["Location"]
        return self.callback_url

    def callback(self, url: str | None = None) -> Any:
        parts = urlsplit(url or self.callback_url)
        return self.client.get(f"{parts.path}?{parts.query}")

    def ehr_launch(self, patient: str = "pat-1", study: str | None = None) -> Any:
        from urllib.parse import urlencode

        launch = self.ehr.new_launch(patient, study)
        self.start(urlencode({"iss": self.ehr.fhir_base, "launch": launch}))
        self.authorize()
        return self.callback()

    @property
    def params(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.authorize_url).query).items()}
