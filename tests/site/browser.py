"""Headless-browser check of the Prefect UI (Debian chromium + chromedriver, Selenium).

`check_prefect_ui` opens the Prefect 3 UI (the default Vue UI, not the opt-in "V2 UI"),
finds a deployment on /deployments, waits for a flow run's page to show it Completed,
opens that run's Artifacts tab and checks the artifact keys there, saving a screenshot of
each page into `out_dir`. Selectors were taken from the UI that prefect==3.9.1 serves.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

CHROMIUM = "/usr/bin/chromium"  # Debian package `chromium`
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian package `chromium-driver`

BROWSER_ARGS = (
    "--headless=new",
    "--no-sandbox",  # needed when running as root
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
)

# Selectors / texts of the Prefect 3.9.1 UI.
DEPLOYMENT_LINK = "a.deployment-list__name"  # one per row, text/title = deployment name
DEPLOYMENT_SEARCH = "input[type=search][placeholder^='Search deployments']"
DEPLOYMENT_COUNT = re.compile(r"\b\d+ Deployments?\b")  # "1 Deployment", shown once loaded
STATE_BADGE = ".state-badge"  # <span class="p-tag state-badge state--completed">Completed
STATE_CLASS = re.compile(r"\bstate--(\w+)")
TERMINAL_STATES = ("completed", "failed", "crashed", "cancelled")
NOT_FOUND_TEXT = "Page not found"  # an unknown run id redirects to the UI's 404 page
ARTIFACTS_TAB = "li.p-tab#artifacts"  # tabs: logs, task-runs, subflow-runs, artifacts, ...
ARTIFACTS_PANEL = "#artifacts-content"  # role=tabpanel shown after clicking the tab
ARTIFACT_TITLE = ".artifact-card__title"  # one per artifact card, text = key


def _new_driver(timeout_s: float) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in BROWSER_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(timeout_s)
    return driver


def _body_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def _texts(driver: Any, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [str(e.text).strip() for e in driver.find_elements(By.CSS_SELECTOR, css)]


def check_prefect_ui(
    ui_url: str,
    deployment_name: str,
    flow_run_id: str,
    artifact_keys: list[str],
    out_dir: pathlib.Path,
    timeout_s: float = 60,
) -> dict[str, Any]:
    """Check the Prefect UI at `ui_url` in headless Chromium; screenshots go to `out_dir`.

    `deployment_name` is the deployment's name, or "flow-name/deployment-name".
    `timeout_s` bounds each wait (and each page load), not the whole check.
    Returns {"screenshots": {"deployments"|"flow-run"|"artifacts": path}, "deployment_url",
    "flow_run_name", "flow_run_state", "artifact_keys", "artifact_urls", "seconds"}.
    Raises AssertionError with a one-line message (what was missing, on which URL, the
    screenshot path) when something is not shown; `<page>-failed.png`/`.txt` (the page's
    text) are left in `out_dir` then. The browser is always quit.
    """
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    base = ui_url.rstrip("/")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flow_name, _, dep_name = deployment_name.rpartition("/")
    shots: dict[str, str] = {}
    found: dict[str, Any] = {}

    driver = _new_driver(timeout_s)
    try:

        def shot(name: str) -> str:
            path = out_dir / f"{name}.png"
            driver.save_screenshot(str(path))
            return str(path)

        def fail(what: str, page: str, url: str) -> AssertionError:
            failed = shot(f"{page}-failed")
            with contextlib.suppress(Exception):
                (out_dir / f"{page}-failed.txt").write_text(_body_text(driver))
            now = driver.current_url
            where = url if now == url else f"{url} (browser at {now})"
            return AssertionError(f"Prefect UI: {what} on {where} (screenshot: {failed})")

        def wait_for(
            cond: Callable[[Any], Any], what: str | Callable[[], str], page: str, url: str
        ) -> Any:
            try:
                return WebDriverWait(
                    driver,
                    timeout_s,
                    poll_frequency=0.25,
                    ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
                ).until(cond)
            except TimeoutException:
                if callable(what):
                    try:
                        what = what()
                    except Exception as exc:  # the page itself is broken: say so
                        what = f"({type(exc).__name__} while checking the page)"
                raise fail(f"{what} not shown within {timeout_s:g}s", page, url) from None

        # 1. Deployments list: the row's link carries the deployment name.
        def deployment_row(d: Any) -> bool:
            return dep_name in _texts(d, DEPLOYMENT_LINK) and (
                not flow_name or flow_name in _body_text(d)
            )

        url = f"{base}/deployments"
        driver.get(url)
        wait_for(
            lambda d: deployment_row(d) or DEPLOYMENT_COUNT.search(_body_text(d)),
            "the deployments list",
            "deployments",
            url,
        )
        if not deployment_row(driver):  # e.g. not on the first page: search for it
            search = driver.find_elements(By.CSS_SELECTOR, DEPLOYMENT_SEARCH)
            if search:
                search[0].send_keys(dep_name)
            wait_for(deployment_row, f"deployment {deployment_name!r}", "deployments", url)
        found["deployment_url"] = next(
            e.get_attribute("href")
            for e in driver.find_elements(By.CSS_SELECTOR, DEPLOYMENT_LINK)
            if e.text.strip() == dep_name
        )
        shots["deployments"] = shot("deployments")

        # 2. Flow run page: the header's state badge reaches a Completed-type state.
        def run_state(d: Any) -> tuple[str, str] | None:
            if NOT_FOUND_TEXT in _body_text(d):
                return "missing", NOT_FOUND_TEXT
            badges = d.find_elements(By.CSS_SELECTOR, STATE_BADGE)
            if not badges:
                return None
            m = STATE_CLASS.search(badges[0].get_attribute("class") or "")
            # .text is only the visible text: empty while the badge is still being laid out
            # (seen under load); textContent is there as soon as it is rendered.
            name = (badges[0].text or badges[0].get_attribute("textContent") or "").strip()
            state = (m.group(1) if m else "", name)
            last_state[0] = state[1]
            return state if state[0] in TERMINAL_STATES and name else None

        last_state = ["(no state badge)"]
        url = f"{base}/runs/flow-run/{flow_run_id}"
        driver.get(url)
        state_type, state_name = wait_for(
            run_state,
            lambda: f"flow run {flow_run_id} Completed (last state: {last_state[0]})",
            "flow-run",
            url,
        )
        if state_type != "completed":
            raise fail(f"flow run {flow_run_id} is {state_name}, not Completed", "flow-run", url)
        found["flow_run_state"] = state_name
        header = _texts(driver, ".p-layout-default__header")
        lines = header[0].splitlines() if header else []
        found["flow_run_name"] = lines[1] if len(lines) > 1 and lines[0] == "Runs" else None
        shots["flow-run"] = shot("flow-run")

        # 3. The run's Artifacts tab: every key has an artifact card. (Opening
        # ?tab=Artifacts directly falls back to the Logs tab, so click the tab.)
        tab = wait_for(
            lambda d: next(
                (e for e in d.find_elements(By.CSS_SELECTOR, ARTIFACTS_TAB) if e.is_displayed()),
                None,
            ),
            "the flow run's Artifacts tab",
            "artifacts",
            url,
        )
        tab.click()
        url = driver.current_url  # .../runs/flow-run/<id>?tab=Artifacts

        def missing_keys(d: Any) -> list[str]:
            panel = d.find_element(By.CSS_SELECTOR, ARTIFACTS_PANEL).text.splitlines()
            shown = {line.strip() for line in panel}
            return [k for k in artifact_keys if k not in shown]

        wait_for(
            lambda d: not missing_keys(d),
            lambda: f"artifact key(s) {missing_keys(driver)} of flow run {flow_run_id}",
            "artifacts",
            url,
        )
        found["artifact_keys"] = [k for k in _texts(driver, ARTIFACT_TITLE) if k]
        found["artifact_urls"] = {
            title.text.strip(): link.get_attribute("href")
            for title in driver.find_elements(By.CSS_SELECTOR, ARTIFACT_TITLE)
            for link in title.find_elements(By.XPATH, "./ancestor::a[1]")
        }
        shots["artifacts"] = shot("artifacts")
    finally:
        driver.quit()

    return {"screenshots": shots, **found, "seconds": round(time.monotonic() - started, 1)}


def page_texts(pages: list[tuple[str, str, Callable[[str], bool]]], out_dir: pathlib.Path,
               timeout_s: float = 60) -> dict[str, str]:  # fmt: skip
    """Open each (name, url, ready) in one headless Chromium and wait until ``ready(text of
    the page)``; a screenshot ``<name>.png`` each. Returns each page's text. Raises
    AssertionError in one line (which page, its URL, its screenshot and the text's head)
    when a page never gets ready. The browser is always quit."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    driver = _new_driver(timeout_s)
    texts: dict[str, str] = {}
    try:
        for name, url, ready in pages:
            driver.get(url)
            deadline = time.monotonic() + timeout_s
            text = ""
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    text = _body_text(driver)
                    if ready(text):
                        break
                time.sleep(0.5)
            else:
                path = out_dir / f"{name}-failed.png"
                driver.save_screenshot(str(path))
                (out_dir / f"{name}-failed.txt").write_text(text)
                head = " ".join(text.split())[:300]
                raise AssertionError(f"Prefect UI: page {name} ({url}) not ready within "
                                     f"{timeout_s:g}s (screenshot: {path}); it shows: "
                                     f"{head}")  # fmt: skip
            driver.save_screenshot(str(out_dir / f"{name}.png"))
            texts[name] = text
    finally:
        driver.quit()
    return texts
