"""The studio in a real browser (Debian's Chromium driven by Playwright): generate, tune, compare, select, cancel.

Screenshots land in test-artifacts/studio/. Chromium comes from apt (`.ci/run` installs it); Playwright's own
browser download is never used. Without Chromium the test fails in CI and is skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.ui.conftest import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def page(studio_url):
    if not shutil.which(CHROMIUM):
        message = f"Chromium not found at {CHROMIUM}: install Debian's chromium package (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(studio_url)
        page.wait_for_selector("#generate", timeout=60_000)
        yield page
        browser.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def wait_status(page, text: str, timeout: float = 120_000) -> str:
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({text!r})", timeout=timeout)
    return page.locator("#status").inner_text()


def generate(page, until: str = "Done") -> str:
    """Click Generate; wait until the status names a new job (not the previous run's) and contains `until`."""
    before = re.search(r"job ([0-9a-f]{8})", page.locator("#status").inner_text())
    old_job = before.group(1) if before else "none"
    page.locator("#generate").click()
    page.wait_for_function(
        "(() => { const s = document.querySelector('#status').innerText;"
        f" return s.includes({until!r}) && /job [0-9a-f]{{8}}/.test(s) && !s.includes('job ' + {old_job!r}); }})()",
        timeout=120_000,
    )
    return page.locator("#status").inner_text()


def whole_images_in_view(page, elem_id: str) -> bool:
    """Every image of the gallery is shown whole: inside the gallery's box (no scrolling to see it) and not cropped
    (object-fit contain, or a box of the image's own shape)."""
    return page.evaluate(
        """(id) => {
        const box = document.getElementById(id).getBoundingClientRect();
        const imgs = [...document.querySelectorAll('#' + id + ' img')];
        return imgs.length > 0 && imgs.every(i => {
            const b = i.getBoundingClientRect();
            const uncropped = getComputedStyle(i).objectFit === 'contain'
                || Math.abs(b.width / b.height - i.naturalWidth / i.naturalHeight) < 0.02;
            return uncropped && b.top >= box.top && b.bottom <= box.bottom
                && b.left >= box.left && b.right <= box.right;
        });
    }""",
        elem_id,
    )


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_generate_tune_compare(page):
    shot(page, "0-start")
    assert "cascade-studio-demo" in page.locator("#model-banner").inner_text()
    page.locator("#prompt textarea").fill("a red circle on a white background")
    assert "tokens" in page.locator("#tokens").inner_text()
    set_number(page, "num-images", 2)
    status = generate(page)
    seeds = [int(s) for s in re.search(r"seeds (\d+), (\d+)", status).groups()]
    assert seeds[1] == seeds[0] + 1
    page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2")
    gallery_text = page.locator("#gallery").inner_text()
    assert f"seed {seeds[0]}" in gallery_text and f"seed {seeds[1]}" in gallery_text
    assert page.locator("#seed input").input_value() == str(seeds[0])  # the seed used is shown
    assert whole_images_in_view(page, "gallery")
    shot(page, "1-generated")

    # Keep the seed, change only a decoder setting: the prior comes from the cache.
    page.locator("#randomize input").uncheck()
    default_steps = page.locator("#decoder-steps input[type=number]").input_value()
    set_number(page, "decoder-steps", 5)
    status = generate(page)
    assert "prior: cached" in status and f"seeds {seeds[0]}, {seeds[1]}" in status
    shot(page, "2-tuned")

    # The A/B view compares the previous image with the new one and lists what changed.
    page.get_by_role("tab", name="Compare A/B").click()
    page.wait_for_function("document.querySelector('#ab-changes').innerText.includes('seed same')")
    assert f"decoder steps {default_steps} → 5, seed same" in page.locator("#ab-changes").inner_text()
    assert page.locator("#ab-slider img").count() >= 2
    page.locator("#ab-slider").screenshot(path=str(ARTIFACTS / "3-compare.png"))

    # Selecting the second image shows its own settings; its seed can be reused.
    page.locator("#gallery img").nth(1).click()
    page.wait_for_function(f"document.querySelector('#details').innerText.includes('Seed: {seeds[1]} (image 2 of 2')")
    page.locator("#reuse-seed").click()
    page.wait_for_function(f"document.querySelector('#seed input').value === '{seeds[1]}'")
    assert not page.locator("#randomize input").is_checked()
    shot(page, "4-selected")


def test_cancel_a_running_job(studio_url, page):
    """On a page of its own: a long run (8 images at 1024x1024, 100 prior steps), cancelled while the prior runs.
    A prior step of this size takes many seconds on a CPU; Cancel must not wait for it to end."""
    fresh = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    fresh.goto(studio_url)
    fresh.wait_for_selector("#generate", timeout=60_000)
    fresh.locator("#prompt textarea").fill("a red circle on a white background")
    fresh.locator("#size input").click()
    fresh.get_by_role("option", name="1024×1024 (1:1)").click()
    set_number(fresh, "prior-steps", 100)
    set_number(fresh, "num-images", 8)
    generate(fresh, until="Prior step")
    fresh.locator("#cancel").click()
    try:
        wait_status(fresh, "Cancelled", timeout=10_000)
        assert fresh.locator("#gallery img").count() == 0
    finally:
        shot(fresh, "5-cancelled")
    # The server keeps serving: the next run on the same page finishes.
    set_number(fresh, "num-images", 1)
    set_number(fresh, "prior-steps", 5)
    fresh.locator("#size input").click()
    fresh.get_by_role("option", name=re.compile("this model's size")).click()
    assert "Done" in generate(fresh)
    fresh.wait_for_function("document.querySelectorAll('#gallery img').length === 1")
    assert whole_images_in_view(fresh, "gallery")  # a lone image once filled the width and was cropped
    fresh.close()
