"""The MLflow UI, in a real (headless) Chromium, showing a run of the tiny config (the naive run of
the comparison in tests/integration/conftest.py::tiny_compare_on_server): its comparison in the
experiment's model-training view, its avg_acc and forgetting, the metric charts drawn, and the
heatmap artifact. Screenshots go to the test's directory (and to $FORGETLESS_UI_SCREENSHOTS, which
is how docs/img/mlflow_ui_*.png were made)."""

import os
import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:  # pragma: no cover - selenium is a dev dependency
    selenium = None

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and selenium),
    reason="needs Debian's chromium and chromium-driver (make test installs them where it runs as root with apt) "
           "and selenium")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,950"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, check, what: str, timeout: float = 90.0):
    """Poll ``check(driver)`` until it returns something truthy; fail naming ``what`` and the page's text."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check(driver)
        except Exception:  # noqa: BLE001 - the page is still being drawn
            found = None
        if found:
            return found
        time.sleep(0.5)
    text = driver.find_element(By.TAG_NAME, "body").text[:1500]
    pytest.fail(f"the MLflow UI never showed {what} within {timeout:.0f} s; the page said:\n{text}")


def shoot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    if os.environ.get("FORGETLESS_UI_SCREENSHOTS"):
        target = Path(os.environ["FORGETLESS_UI_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(target / f"mlflow_ui_{name}.png"))


def test_the_ui_shows_the_run_its_metrics_charts_and_heatmap(tiny_compare_on_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    result, out, server = tiny_compare_on_server.result, tiny_compare_on_server.out, tiny_compare_on_server.uri
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(server)
    run_id = __import__("json").loads((out / "naive" / "seed-0" / "report.json").read_text())["mlflow"]["run_id"]
    run = client.get_run(run_id)
    eid = run.info.experiment_id
    body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731

    # the experiment, opened with the link the CLI printed: the comparison is listed as a training run
    # (the UI folds its strategies' runs under it)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    browser.get(f"{server}/#/experiments/{eid}?workflowType=machine_learning")
    wait_for(browser, lambda d: parent.info.run_name in body(d), f"the run {parent.info.run_name!r} in the run list")
    assert "Model training" in body(browser)
    shoot(browser, tmp_path, "experiment")

    # the run: its forgetting metrics with the values the report has
    browser.get(f"{server}/#/experiments/{eid}/runs/{run_id}?workflowType=machine_learning")
    text = wait_for(browser, lambda d: "forgetting" in body(d) and "avg_acc" in body(d) and body(d),
                    "avg_acc and forgetting on the run page")
    lines = text.splitlines()
    for metric in ("avg_acc", "forgetting"):
        shown = lines[lines.index(metric) + 1]
        assert float(shown) == pytest.approx(run.data.metrics[metric], abs=1e-6), (metric, shown)
    shoot(browser, tmp_path, "run")

    # the metric charts: Plotly draws a line for each of acc/<task>, train_loss, avg_acc, ...
    browser.get(f"{server}/#/experiments/{eid}/runs/{run_id}/model-metrics?workflowType=machine_learning")
    lines_drawn = wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line")) >= 4
                           and d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line"),
                           "metric charts with their lines drawn")
    shoot(browser, tmp_path, "charts")
    assert any(len(line.get_attribute("d") or "") > 10 for line in lines_drawn)  # a path, not an empty placeholder
    assert "question_type" in body(browser) and "train_loss" in body(browser)  # acc/<task> and the loss

    # the heatmap artifact, loaded as an image
    browser.get(f"{server}/#/experiments/{eid}/runs/{run_id}/artifacts/acc_heatmap.png?workflowType=machine_learning")
    width = wait_for(browser, lambda d: max((d.execute_script("return arguments[0].naturalWidth", img)
                                             for img in d.find_elements(By.CSS_SELECTOR, "img[src^='blob:']")),
                                            default=0),
                     "the acc_heatmap.png artifact as an image")
    assert width >= 200
    shoot(browser, tmp_path, "heatmap")
