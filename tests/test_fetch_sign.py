"""The batch path's own SigV4 query signing (speaker_sim_cli/io/fetch.py, ``_Template``) gives
the same URLs, byte for byte, as botocore's presigner, and a real S3 server (moto's, in a
subprocess) accepts them."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import fuzz_settings, moto_s3  # type: ignore[import-not-found]
from speaker_sim_cli.io import fetch, storage

pytest.importorskip("botocore")

FUZZ = fuzz_settings(200)
WHEN = dt.datetime(2026, 12, 7, 17, 4, 59, tzinfo=dt.timezone.utc)
KEYS = [
    "rec/r00001.wav",
    "a b+c.wav",
    "id10270/5r0dWxy17C8/00001.wav",
    "x!$&'()*+,;=:@~_-.y",
    "deep/er/and/deeper/file",
    "trailing/",
    # not plain: botocore signs these itself (same bytes by construction)
    "ünïcode/файл.wav",
    "per%cent",
    "a//b",
    "./dot",
    "a/../b",
    "tab\there",
]
CONFIGS = {
    "local path-style": {"endpoint_url": "http://127.0.0.1:18555", "key": "AK", "secret": "s/k+1"},
    "https, default port": {"endpoint_url": "https://s3.example.org", "key": "AK", "secret": "x"},
    "AWS, virtual-hosted": {
        "key": "AKIDEXAMPLE",
        "secret": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "client_kwargs": {"region_name": "eu-west-3"},
    },
    "session token": {
        "endpoint_url": "http://localhost:9000",
        "key": "AK",
        "secret": "SK",
        "token": "tok/en+with=odd&chars",
    },
}


@pytest.fixture
def frozen(monkeypatch):
    """botocore's clock and ours at the same second."""
    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: WHEN)
    monkeypatch.setattr(fetch, "_amz_date", lambda: WHEN.strftime("%Y%m%dT%H%M%SZ"))
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


_MADE: dict[str, fetch._S3Signer] = {}


def signer_of(config: str) -> fetch._S3Signer:
    """One signer per configuration (a botocore client costs ~50 ms), templates emptied."""
    if config not in _MADE:
        _MADE[config] = fetch._S3Signer(CONFIGS[config])
    _MADE[config]._templates = {}
    return _MADE[config]


def botocore_url(signer: fetch._S3Signer, rest: str, method: str) -> str:
    bucket, _, key = rest.partition("/")
    return signer._botocore_url(bucket, key, method)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_signed_urls_are_botocore_s_byte_for_byte(frozen, config, method):
    signer = signer_of(config)
    for bucket in ("speaker-sim-test", "bench"):
        for key in KEYS:
            rest = f"{bucket}/{key}"
            assert signer.url(rest, method) == botocore_url(signer, rest, method), (config, key)
    # the template was derived (our signer did the work), one per bucket and method
    assert signer._templates and all(t is not None for t in signer._templates.values())


@FUZZ
@given(key=st.text(min_size=1, max_size=60))
def test_any_key_is_signed_as_botocore_signs_it(frozen, key):
    signer = signer_of("local path-style")
    rest = f"bench/{key}"
    assert signer.url(rest, "GET") == botocore_url(signer, rest, "GET")


@FUZZ
@given(key=st.text(alphabet="abcXYZ019 ._~!$&'()*+,;=:@/-", min_size=1, max_size=60))
def test_plain_keys_are_signed_by_the_template(frozen, key):
    signer = signer_of("AWS, virtual-hosted")
    rest = f"bench/{key}"
    assert signer.url(rest, "GET") == botocore_url(signer, rest, "GET")


def test_a_new_day_or_credential_derives_a_new_template(frozen, monkeypatch):
    signer = signer_of("local path-style")
    signer.url("bench/a.wav", "GET")
    first = dict(signer._templates)
    later = WHEN + dt.timedelta(days=1)
    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: later)
    monkeypatch.setattr(fetch, "_amz_date", lambda: later.strftime("%Y%m%dT%H%M%SZ"))
    url = signer.url("bench/a.wav", "GET")
    assert url == botocore_url(signer, "bench/a.wav", "GET")
    assert "20261208" in url and signer._templates.keys() != first.keys()


def test_the_real_server_accepts_the_signed_urls(tmp_path):
    """GETs and HEADs signed by the template, and by botocore for keys it leaves to botocore,
    against moto's server; a wrong secret is refused and left to s3fs, which words it."""
    with moto_s3("signed") as server:
        fs = server["fs"]
        want = {f"s3://signed/{k}": os.urandom(100 + i) for i, k in enumerate(KEYS[:5])}
        want["s3://signed/ünïcode/файл.wav"] = b"botocore-signed"
        for url, data in want.items():
            fs.pipe_file(url[5:], data)
        before = dict(fetch.COUNTS)
        got = storage.read_many(list(want), in_flight=3)
        assert got == list(want.values())
        heads = fetch.fetch(list(want), head=True)
        assert [h.size for h in heads] == [len(v) for v in want.values()]
        assert fetch.COUNTS["fetched"] - before["fetched"] == 2 * len(want)
        assert fetch.COUNTS["fallback"] == before["fallback"]
