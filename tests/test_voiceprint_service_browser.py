"""The login page in headless Chromium (Debian's ``chromium``, driven by Playwright's Python
client): the microphone is fed from a VCTK recording with Chromium's fake-media flags; the page
records through its AudioWorklet, resamples, encodes WAV, enrols, then identifies; the result is
read from the page and a screenshot is kept as a test artefact.

Chromium missing: skipped with the reason, failed instead under SPEAKER_SIM_REQUIRE_SHARED=1 (CI
installs it: .ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_voiceprint_service import ADMIN, CLIENT, post_audio, start_server, vctk

pytestmark = pytest.mark.slow
sf = pytest.importorskip("soundfile")
CHROMIUM = os.environ.get("SPEAKER_SIM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Where the screenshot is kept (SPEAKER_SIM_ARTEFACTS, else the test's temporary folder).
ARTEFACTS = os.environ.get("SPEAKER_SIM_ARTEFACTS")


def _need_browser() -> None:
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"chromium ({CHROMIUM}; apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python client (pip install playwright)")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("SPEAKER_SIM_REQUIRE_SHARED") == "1":
            pytest.fail(f"{msg} (SPEAKER_SIM_REQUIRE_SHARED=1)")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def server(shared: Path, real_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    _need_browser()
    folder = tmp_path_factory.mktemp("browser")
    # A 3.5 s enrolment minimum: one 3 s recording from the page cannot reach it, two do.
    srv = start_server(folder, ["--enrol-seconds", "3.5", "--min-seconds", "1"])
    # Another speaker, enrolled over HTTP, so that identifying is a real choice.
    for n in ("003", "008", "011"):
        r = post_audio(
            f"{srv.url}/v1/speakers/p226/enrol", vctk(shared, "p226", n).read_bytes(), ADMIN
        )
        assert r.status_code == 200, r.text
    yield srv
    assert srv.stop() == 0, srv.tail()


def _mic(shared: Path, folder: Path, names: tuple[str, ...]) -> Path:
    """A WAV of p225's recordings ``names`` for the fake microphone (it plays it in a loop)."""
    parts = [sf.read(vctk(shared, "p225", n), dtype="float32")[0] for n in names]
    path = folder / f"mic-{'-'.join(names)}.wav"
    sf.write(path, np.concatenate(parts), 16000, subtype="PCM_16")
    return path


def _browser(p: Any, mic: Path) -> Any:
    return p.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}",
            "--no-sandbox",
        ],
    )


def test_page_records_enrols_and_identifies(server, shared, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(ARTEFACTS) if ARTEFACTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        # Enrol from one microphone stream, identify from another (other recordings of p225):
        # the fake device restarts its file for every capture.
        browser = _browser(p, _mic(shared, tmp_path, ("016", "019")))
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/")
            page.fill("#key", ADMIN)
            page.fill("#seconds", "3")
            page.fill("#name", "p225")
            # The page's CSP (default-src 'self') forbids eval: wait with locators, not scripts.
            page.click("#enrol")
            expect(page.locator("#progress-text")).to_have_text(
                re.compile("s of speech"), timeout=90_000
            )
            first = page.text_content("#progress-text")
            # The fake device starts its file again for every capture: a second 3 s capture can
            # be the first one byte for byte, which the library keeps once (a duplicate adds no
            # speech). 4 s holds the first 3 s and more, so it is always new speech.
            page.fill("#seconds", "4")
            page.click("#enrol")
            try:
                expect(page.locator("#progress-text")).to_have_text(
                    re.compile("enrolment complete"), timeout=90_000
                )
            except AssertionError as exc:
                said = page.text_content("#status"), page.text_content("#result")
                raise AssertionError(f"{exc}\npage status and result: {said}") from None
            assert first is not None and "more" in first, first  # 3 s hold < 3.5 s of speech
            rate = page.evaluate("new AudioContext().sampleRate")
        finally:
            browser.close()
        browser = _browser(p, _mic(shared, tmp_path, ("021", "022")))
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/")
            page.fill("#key", CLIENT)
            page.fill("#seconds", "3")
            page.click("#identify")
            expect(page.locator("#status")).to_have_text(re.compile("^Identified"), timeout=90_000)
            status = page.text_content("#status")
            page.screenshot(path=str(shots / "voiceprint-login-page.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert status is not None and status.startswith("Identified: p225 "), status
    assert (shots / "voiceprint-login-page.png").stat().st_size > 1000
    assert rate != 16000  # the page's resampling was exercised
