"""Property tests: whatever body arrives, the mock answers 200 or 400 (never 5xx without an injected
fault), and it accepts exactly the bodies the shared contract accepts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.api import SUBMIT_PATH, TASK_RESULT_PATH, SubmitRequest
from mock_server import MockConfig, create_app
from mock_server.testing import InProcessTransport
from tests.imaging import data_uri, png

VALID = {"image": data_uri(png(640, 360)), "prompt": "boat"}
FIELDS = [
    "image",
    "prompt",
    "last_image",
    "fps",
    "seed",
    "ratio",
    "duration",
    "resolution",
    "watermark",
    "camera_fixed",
    "generate_audio",
    "service_tier",
    "execution_expires_after",
    "colour",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
field_values = json_values | st.sampled_from(
    [
        24,
        4,
        12,
        3600,
        259200,
        "720p",
        "flex",
        "16:9",
        "https://example.com/a.png",
        VALID["image"],
        "data:image/png;base64,AAAA",
        True,
        False,
        -1,
        4294967295,
    ]
)
bodies = st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, field_values)).map(
    lambda extra: {**VALID, **extra}
) | st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6)


def _client(runner: asyncio.Runner) -> tuple[httpx.AsyncClient, Any]:
    config = MockConfig(time_scale=0.001, model_rpm=None, quotas={"default": {}, "flex": {}})
    app = create_app(config, seed=1)
    client = httpx.AsyncClient(
        transport=InProcessTransport(app), base_url="http://m", headers={"Authorization": "Bearer k"}
    )
    return client, app


def test_the_mock_accepts_exactly_the_bodies_the_contract_accepts() -> None:
    with asyncio.Runner() as runner:
        client, _ = _client(runner)

        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(bodies)
        def check(payload: dict[str, Any]) -> None:
            response = runner.run(client.post(SUBMIT_PATH, json=payload))
            try:
                SubmitRequest.model_validate(payload)
                valid = True
            except ValidationError:
                valid = False
            assert response.status_code == (200 if valid else 400), response.text

        check()
        runner.run(client.aclose())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_never_get_a_5xx(raw: bytes) -> None:
    with asyncio.Runner() as runner:
        client, _ = _client(runner)
        response = runner.run(client.post(SUBMIT_PATH, content=raw))
        assert response.status_code == 400
        response = runner.run(client.get(TASK_RESULT_PATH, params={"task_id": raw.decode("latin-1")}))
        assert response.status_code in (400, 404)
        runner.run(client.aclose())
