"""The security surface of a server set up with an API key, CORS origins and a small body
limit, in front of a real engine (one CPU worker, the bundled model)."""
from __future__ import annotations

import aiohttp
import pytest
import pytest_asyncio
from server_helpers import assert_error_body, post, post_raw, scrape, serving, wait_for_model

from esp.engine import EngineConfig
from esp.engine.engine import Engine
from esp.engine.server import ServerOptions

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "sk-test-0123456789"
ORIGIN = "https://app.example"
LIMIT = 4096
BODY = {"prompt": "hi", "max_tokens": 1, "ignore_eos": True}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    await wait_for_model()
    async with Engine(EngineConfig(kv_tokens_per_instance=2048)) as eng:
        yield eng


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def url(engine):
    options = ServerOptions(port=0, api_key=KEY, allowed_origins=(ORIGIN,), max_body_bytes=LIMIT)
    async with serving(engine, options) as url:
        yield url


@pytest_asyncio.fixture(loop_scope="module")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}],
                         ids=["missing", "wrong", "no-scheme", "basic", "longer"])
async def test_api_key_missing_or_wrong_is_401(engine, url, http, headers):
    for method, path, body in (("POST", "/v1/completions", BODY), ("GET", "/v1/models", None)):
        async with http.request(method, url + path, json=body, headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            error = assert_error_body(await resp.json(), 401)
        assert error["code"] == "invalid_api_key" and KEY not in error["message"]


async def test_api_key_right_is_200_and_open_routes_stay_open(engine, url, http):
    status, out = await post(http, url, "/v1/completions", BODY, headers=AUTH)
    assert status == 200 and out["usage"]["completion_tokens"] == 1
    async with http.get(url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}) as resp:
        assert resp.status == 200
    for path in ("/health", "/metrics", "/openapi.json"):
        async with http.get(url + path) as resp:
            assert resp.status == 200, path
    async with http.get(url + "/openapi.json") as resp:
        doc = await resp.json()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]


async def test_cors_allows_only_the_listed_origin(engine, url, http):
    async with http.post(url + "/v1/completions", json=BODY, headers={**AUTH, "Origin": ORIGIN}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN and resp.headers["Vary"] == "Origin"
    async with http.post(url + "/v1/completions", json=BODY, headers={"Origin": ORIGIN}) as resp:
        assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with http.post(url + "/v1/completions", json=BODY, headers={**AUTH, "Origin": "https://evil.example"}) \
            as resp:
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with http.options(url + "/v1/completions", headers={**preflight, "Origin": ORIGIN}) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
    async with http.options(url + "/v1/completions", headers={**preflight, "Origin": "https://evil.example"}) \
            as resp:
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        assert_error_body(await resp.json(), 403)


async def test_body_over_the_limit_is_413(engine, url, http):
    def padded(size: int) -> bytes:
        head = b'{"prompt": "hi", "max_tokens": 1, "user": "'
        return head + b"a" * (size - len(head) - 2) + b'"}'

    status, _, out = await post_raw(http, url, "/v1/completions", padded(LIMIT + 1), **AUTH)
    assert status == 413
    assert str(LIMIT) in assert_error_body(out, 413)["message"]
    status, _, out = await post_raw(http, url, "/v1/completions", padded(LIMIT), **AUTH)
    assert status == 200, out


async def test_rejections_are_counted_by_reason(engine, url, http):
    before = await scrape(http, url)
    await post(http, url, "/v1/completions", BODY)
    await post_raw(http, url, "/v1/completions", b"x" * (LIMIT + 1), **AUTH)
    await post_raw(http, url, "/v1/completions", b"{}", "text/plain", **AUTH)
    after = await scrape(http, url)
    for reason in ("unauthorized", "too_large", "unsupported_media_type"):
        key = ("esp_request_rejected_total", (("reason", reason),))
        assert after[key] - before.get(key, 0) == 1, reason
