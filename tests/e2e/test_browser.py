"""The demo page in a real browser: headless Chromium, driven by Selenium through the system chromedriver, against
the in-thread uvicorn server. Every number the page shows is checked against the API's own answer."""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import numpy as np
import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from service.config import Settings
from service.main import create_app
from tests.conftest import DOG, ROOT
from tests.e2e.conftest import ThreadedServer

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
DIGIT = ROOT / "service" / "samples" / "digit.png"
TIMEOUT_S = 20

T = TypeVar("T")


def artifacts_dir() -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for(driver: Any, condition: Callable[[Any], T], message: str, timeout: float = TIMEOUT_S) -> T:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def save_screenshot(driver: WebDriver, name: str, css: str = "body") -> Path:
    """The element `css` in full, even where it runs past the window (DevTools captures beyond the viewport)."""
    box = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height, scale: 1};",
        css,
    )
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": box})
    path = artifacts_dir() / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the browser test needs Debian's chromium and chromium-driver; "
            "`make test` installs them (its system-tools target, which CI runs too)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    with (
        pytest.MonkeyPatch.context() as env,
        tempfile.TemporaryDirectory(prefix="featuremap-chromium-", ignore_cleanup_errors=True) as profile,
    ):
        env.setenv("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver to download
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def api(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        wait_for(client, lambda c: c.get("/readyz").status_code == 200, "the server never became ready", 60)
        yield client


@pytest.fixture
def page(browser: WebDriver, api: httpx.Client, base_url: str) -> WebDriver:
    """The demo page, loaded, with its first run (the tutorial's pipeline on the dog) finished."""
    browser.get_log("browser")  # start each test with an empty console
    browser.get(f"{base_url}/")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "page never ready")
    wait_for(browser, lambda d: run_count(d, "fm-results") >= 1, "the first run never finished")
    return browser


def run_count(driver: WebDriver, results_id: str) -> int:
    return int(driver.find_element(By.ID, results_id).get_attribute("data-run") or 0)


def finish(driver: WebDriver, results_id: str, before: int) -> str:
    """Waits for the run after `before` to end; its state, `done` or `error`."""
    wait_for(driver, lambda d: run_count(d, results_id) > before, f"#{results_id}: no run finished")
    return driver.find_element(By.ID, results_id).get_attribute("data-state") or ""


def rendered_stages(driver: WebDriver, container: str) -> list[dict[str, Any]]:
    """Each stage's shape, heading and its maps' decoded sizes, once every map image has loaded."""
    script = f"""
        const stages = [...document.querySelectorAll('#{container} section.stage')];
        const imgs = stages.flatMap((s) => [...s.querySelectorAll('img')]);
        if (!imgs.length || !imgs.every((i) => i.complete && i.naturalWidth > 0)) return null;
        return stages.map((s) => ({{
            shape: s.dataset.shape.split(',').map(Number),
            heading: s.querySelector('.shape').textContent,
            sizes: [...s.querySelectorAll('img')].map((i) => [i.naturalWidth, i.naturalHeight]),
            kernels: [...s.querySelectorAll('.kernel')].map((k) => k.getAttribute('aria-label')),
        }}));
    """
    stages: list[dict[str, Any]] = wait_for(driver, lambda d: d.execute_script(script), "maps never loaded")
    return stages


def assert_maps_match_shapes(stages: list[dict[str, Any]], shapes: list[list[int]]) -> None:
    assert [s["shape"] for s in stages] == shapes
    for stage, (c, h, w) in zip(stages, shapes, strict=True):
        assert stage["heading"] == f"{c} × {h} × {w}"
        assert stage["sizes"] == [[w, h]] * c  # one map per channel, each decoded at the stage's own size


def natural_size(driver: WebDriver, img_id: str) -> list[int]:
    script = "const img = document.getElementById(arguments[0]); return img.naturalWidth && [img.naturalWidth, img.naturalHeight]"
    size: list[int] = wait_for(driver, lambda d: d.execute_script(script, img_id), f"#{img_id} never loaded")
    return size


def value_under_pointer(driver: WebDriver, img: WebElement, dx: int, dy: int) -> tuple[int, int, float, float]:
    """Points at `img` (offset from its centre); the readout's pixel, value and level step."""
    readout = driver.find_element(
        By.ID, img.find_element(By.XPATH, "ancestor::*[@data-readout][1]").get_attribute("data-readout") or ""
    )
    driver.execute_script("for (const k of Object.keys(arguments[0].dataset)) delete arguments[0].dataset[k]", readout)
    ActionChains(driver, duration=10).move_to_element_with_offset(img, dx, dy).perform()
    wait_for(driver, lambda _: readout.get_attribute("data-x"), "no value under the pointer")
    x, y, value, step = (float(readout.get_attribute(f"data-{k}") or "nan") for k in ("x", "y", "value", "step"))
    return int(x), int(y), value, step


def severe_console_entries(driver: WebDriver) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return [e for e in entries if e["level"] == "SEVERE"]


def test_the_tutorial_pipeline_on_the_dog_shows_every_stage_at_its_shape(page: WebDriver, api: httpx.Client) -> None:
    files = {"image": ("dog.jpg", DOG.read_bytes(), "image/jpeg")}
    spec = {"output": {"format": "json"}}
    truth = api.post("/v1/featuremaps", files=files, data={"spec": json.dumps(spec)}).json()
    shapes = [s["shape"] for s in truth["stages"]]
    assert shapes == [[4, 297, 297], [4, 297, 297], [4, 148, 148]]  # conv 4x4 valid, ReLU, max pool 2

    before = run_count(page, "fm-results")
    page.find_element(By.ID, "fm-run").click()
    assert finish(page, "fm-results", before) == "done"
    stages = rendered_stages(page, "fm-results")
    assert_maps_match_shapes(stages, shapes)
    assert [k.split(":")[0] for k in stages[0]["kernels"]] == [f"kernel seed_{i}" for i in range(1, 5)]
    assert stages[0]["kernels"][0] == "kernel seed_1: -1 -1 1 1; -1 -1 1 1; -1 -1 1 1; -1 -1 1 1"

    # The value under the pointer, read back from the PNG level, agrees with the exact float32 tensor.
    first = page.find_element(By.CSS_SELECTOR, "#fm-results section.stage[data-stage='0'] img")
    x, y, value, step = value_under_pointer(page, first, -21, 13)
    exact = np.asarray(truth["stages"][0]["data"], dtype=np.float32)[0, y, x]
    assert abs(value - exact) <= step / 2 + 1e-5, (x, y, value, exact, step)
    assert page.find_element(By.ID, "fm-readout").text.startswith(f"Stage 0 (conv), seed_1, x {x}, y {y}: level ")

    assert severe_console_entries(page) == []
    save_screenshot(page, "featuremaps-dog.png", "#featuremaps")


def test_an_edited_pipeline_runs_as_edited_and_reads_back_through_a_colormap(
    page: WebDriver, api: httpx.Client
) -> None:
    conv = page.find_element(By.CSS_SELECTOR, "#fm-stages li[data-index='0']")
    Select(conv.find_element(By.CSS_SELECTOR, "[data-field='padding']")).select_by_value("same")
    page.find_element(By.CSS_SELECTOR, "#fm-stages li[data-index='0'] [data-action='new-filter']").click()
    centre = page.find_element(By.CSS_SELECTOR, ".kgrid input[data-r='1'][data-c='1']")  # a 3x3 identity to start
    centre.send_keys(Keys.CONTROL, "a")
    centre.send_keys("2")
    page.find_element(By.CSS_SELECTOR, "[data-action='save-kernel']").click()
    page.find_element(By.CSS_SELECTOR, "button[data-add='pool']").click()
    Select(page.find_element(By.ID, "fm-colormap")).select_by_value("viridis")
    before = run_count(page, "fm-results")
    page.find_element(By.ID, "fm-run").click()
    assert finish(page, "fm-results", before) == "done"

    custom = {"name": "custom_1", "kernel": [[0, 0, 0], [0, 2, 0], [0, 0, 0]]}
    conv_spec = {"op": "conv", "filters": [*(f"seed_{i}" for i in range(1, 5)), custom], "padding": "same"}
    spec = {"layers": [conv_spec, {"op": "relu"}, {"op": "pool"}, {"op": "pool"}], "output": {"format": "json"}}
    files = {"image": ("dog.jpg", DOG.read_bytes(), "image/jpeg")}
    truth = api.post("/v1/featuremaps", files=files, data={"spec": json.dumps(spec)}).json()
    assert [s["shape"] for s in truth["stages"]] == [[5, 300, 300], [5, 300, 300], [5, 150, 150], [5, 75, 75]]
    assert_maps_match_shapes(rendered_stages(page, "fm-results"), [s["shape"] for s in truth["stages"]])
    labels = page.find_elements(By.CSS_SELECTOR, "#fm-results section.stage[data-stage='3'] .channel")
    assert [label.text for label in labels] == [*(f"seed_{i}" for i in range(1, 5)), "custom_1"]

    last = page.find_elements(By.CSS_SELECTOR, "#fm-results section.stage[data-stage='3'] img")[4]
    x, y, value, step = value_under_pointer(page, last, 5, -7)  # viridis pixels, inverted through its table
    exact = np.asarray(truth["stages"][3]["data"], dtype=np.float32)[4, y, x]
    assert abs(value - exact) <= step / 2 + 1e-5, (x, y, value, exact, step)
    save_screenshot(page, "featuremaps-edited.png", "#featuremaps")


def test_a_drawn_one_is_read_by_both_models_with_the_cnn_maps_layer_by_layer(
    page: WebDriver, api: httpx.Client
) -> None:
    canvas = page.find_element(By.ID, "digit-canvas")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    before = run_count(page, "digit-results")
    stroke = ActionChains(page, duration=10).move_to_element_with_offset(canvas, 4, -95).click_and_hold()
    for _ in range(19):  # a "1": one vertical stroke, as a mouse drag of small steps
        stroke.move_by_offset(-1, 10)
    stroke.release().perform()
    assert finish(page, "digit-results", before) == "done"

    for model in ("mlp", "cnn"):
        assert page.find_element(By.ID, f"{model}-label").text == "1", model
        top = page.find_element(By.CSS_SELECTOR, f"#{model}-bars li.top")
        assert top.get_attribute("data-digit") == "1"
        assert natural_size(page, f"{model}-input") == [28, 28]  # include_input: the image the model saw

    files = {"image": ("digit.png", DIGIT.read_bytes(), "image/png")}
    shapes = [s["shape"] for s in api.post("/v1/models/cnn/featuremaps", files=files).json()["stages"]]
    assert_maps_match_shapes(rendered_stages(page, "cnn-maps"), shapes)

    assert severe_console_entries(page) == []
    save_screenshot(page, "digit-one.png", "#digits")


def test_an_api_error_shows_the_problem_title_and_detail(page: WebDriver, api: httpx.Client) -> None:
    spec = {"layers": [{"op": "conv", "filters": "seed4"}, {"op": "relu"}, {"op": "pool", "size": 0}]}
    files = {"image": ("dog.jpg", DOG.read_bytes(), "image/jpeg")}
    r = api.post("/v1/featuremaps", files=files, data={"spec": json.dumps(spec)})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    expected = r.json()

    size = page.find_element(By.CSS_SELECTOR, "#fm-stages li[data-op='pool'] input[name='size']")
    size.send_keys(Keys.CONTROL, "a")
    size.send_keys("0")
    before = run_count(page, "fm-results")
    page.find_element(By.ID, "fm-run").click()
    assert finish(page, "fm-results", before) == "error"

    problem = page.find_element(By.ID, "fm-problem")
    assert problem.is_displayed()
    assert problem.find_element(By.CLASS_NAME, "problem-title").text == expected["title"] == "Invalid request"
    assert problem.find_element(By.CLASS_NAME, "problem-detail").text == expected["detail"]
    assert "layers[2].size" in expected["detail"]
    assert size.get_attribute("aria-invalid") == "true"  # the field the problem's `errors` point at
    assert page.find_elements(By.CSS_SELECTOR, "#fm-results section.stage") == []  # no stale maps beside it
    save_screenshot(page, "problem-pool-size-0.png", "#featuremaps")


def test_every_control_has_an_accessible_name(page: WebDriver) -> None:
    page.find_element(By.CSS_SELECTOR, "#fm-stages li[data-op='conv'] .chip-edit").click()  # the kernel grid too
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".kernel-editor"), "no kernel editor")
    unnamed: list[str] = page.execute_script("""
        return [...document.querySelectorAll('input, select, button, canvas, textarea')]
            .filter((el) => !el.labels?.length && !el.getAttribute('aria-label') && !el.textContent.trim())
            .map((el) => el.outerHTML);
    """)
    assert unnamed == []
    assert len(page.find_elements(By.CSS_SELECTOR, ".kgrid input")) == 16  # seed_1 is 4x4


@pytest.fixture(scope="module")
def keyed_base_url() -> Iterator[str]:
    """A second server, one that wants an API key (models loaded before it accepts connections)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    settings = Settings(api_keys=["demo-key"], warmup=False)
    server = ThreadedServer(uvicorn.Config(create_app(settings), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(server, lambda s: s.started or not thread.is_alive(), "uvicorn did not start", 30)
    assert server.started, "uvicorn did not start"
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_with_api_keys_the_page_loads_asks_for_a_key_and_sends_it(browser: WebDriver, keyed_base_url: str) -> None:
    browser.get(f"{keyed_base_url}/")  # the page and its assets need no key
    wait_for(browser, lambda d: d.find_element(By.ID, "fm-results").get_attribute("data-state") == "error", "no 401")
    problem = browser.find_element(By.ID, "fm-problem")
    assert problem.find_element(By.CLASS_NAME, "problem-title").text == "Unauthorized"
    assert "API key" in problem.find_element(By.CLASS_NAME, "problem-detail").text

    before = run_count(browser, "fm-results")
    browser.find_element(By.ID, "api-key").send_keys("demo-key", Keys.ENTER)
    assert finish(browser, "fm-results", before) == "done"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#fm-results section.stage")) == 3
    assert not browser.find_element(By.ID, "page-problem").is_displayed()
    browser.execute_script("sessionStorage.clear()")  # the key stays with this page's session only
