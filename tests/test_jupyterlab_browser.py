"""JupyterLab in a real browser: notebook 04 runs in headless Chromium (Debian's package, driven by Playwright),
then a lasso drawn and a right-click made on the live ipympl canvas show the chosen images and nearest
neighbours. Screenshots go to $MEDEXPLORE_SCREENSHOTS (docs/jupyter for the README) or the test's folder."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_umap_explorer.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
RUN_MS = 420_000  # the whole notebook (the example model trains first where the MedMNIST files are absent)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (scripts/setup_display.sh)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on localhost serving a copy of notebook 04; yields (url, folder)."""
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    port, token = _free_port(), "medexplore-browser-test"
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, (tmp_path / "jupyter.log").read_text()
            time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}", tmp_path
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def _all_cells_ran(page, timeout: int) -> None:
    page.wait_for_function("""() => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);
        return prompts.length > 0 && prompts.every(t => /\\[\\d+\\]/.test(t));
    }""", timeout=timeout)


def _idle(page) -> None:
    """Wait until the kernel has handled everything (the status bar says Idle)."""
    page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\|\s*Idle")).first.wait_for(timeout=60_000)


def _gallery(page) -> str:
    return page.locator(".widget-output img").first.get_attribute("src") or ""


def _run_in_new_cell(page, code: str) -> str:
    """Type ``code`` into a new last cell, run it, return its printed output."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    count = cells.count()
    cells.last.locator(".jp-InputPrompt").click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    sync_api.expect(cells).to_have_count(count + 1)
    cells.last.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Control+Enter")  # run in place (Shift+Enter would add an empty cell)
    try:
        _all_cells_ran(page, 60_000)
    except Exception:
        page.screenshot(path="/tmp/jlab_debug.png")
        raise
    output = page.locator(".jp-Notebook .jp-CodeCell").last.locator(".jp-OutputArea-output")
    output.first.wait_for(timeout=60_000)
    return output.first.inner_text()


def test_explorer_lasso_and_right_click_in_jupyterlab(lab):
    url, folder = lab
    shots = Path(os.environ.get("MEDEXPLORE_SCREENSHOTS", folder))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1200}, device_scale_factor=1)
        page.goto(url)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
        page.wait_for_function("() => document.body.innerText.includes('Idle')", timeout=120_000)  # the kernel is up
        _run_all(page)
        news = page.locator(".jp-toast-button", has_text=re.compile(r"^No$"))  # JupyterLab's news prompt
        if news.count():
            news.first.click()
        _all_cells_ran(page, RUN_MS)
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]', has_text="Traceback")
        assert errors.count() == 0, errors.first.inner_text()
        canvas = page.locator(".jupyter-matplotlib-canvas-div").first
        caption = page.locator(".widget-html", has_text=re.compile(r"selected|nearest neighbours")).first

        # a lasso: a left drag, as a user draws it, around the middle of the point cloud (where the kernel says
        # its 30th-70th percentiles are drawn: the layout moves with the data the notebook found)
        text = _run_in_new_cell(page, (
            "import numpy as np; xy = explorer.ax.transData.transform(explorer.coords); "
            "lo, hi = np.percentile(xy, 30, 0), np.percentile(xy, 70, 0); h = explorer.figure.bbox.height; "
            "print('CLOUD', lo[0], h - hi[1], hi[0], h - lo[1], explorer.figure.bbox.width, len(explorer.selected))"))
        *cloud, shown = re.search(r"CLOUD (\S+) (\S+) (\S+) (\S+) (\S+) (\d+)", text).groups()
        x0, y0, x1, y1, width = (float(v) for v in cloud)
        # the caption must show the notebook's own lasso (from code) before the drawn one can be told from it: the
        # browser may render that cell's widget messages after its execution has ended
        sync_api.expect(caption).to_have_text(re.compile(rf"^{shown} selected\b"), timeout=60_000)
        before = caption.inner_text()
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        scale = box["width"] / width  # CSS pixels per figure pixel
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0 + 1)]
        page.mouse.move(box["x"] + corners[0][0] * scale, box["y"] + corners[0][1] * scale)
        page.mouse.down()
        for fx, fy in corners[1:]:
            page.mouse.move(box["x"] + fx * scale, box["y"] + fy * scale, steps=8)
        page.mouse.up()
        sync_api.expect(caption).not_to_have_text(before, timeout=60_000)
        _idle(page)
        count = int(re.search(r"(\d+) selected", caption.inner_text())[1])
        assert count > 0 and caption.inner_text().count("#") == min(count, 12)  # the images shown, named
        assert page.locator(".widget-output img").count() >= 1
        lasso_gallery = _gallery(page)
        assert lasso_gallery
        canvas.evaluate("e => e.scrollIntoView({block: 'center'})")
        page.screenshot(path=str(shots / "explorer_lasso.png"))
        text = _run_in_new_cell(page, "print('SELECTED', len(explorer.selected))")
        assert f"SELECTED {count}" in text  # the kernel holds what the browser shows

        # a right-click on one point: where the kernel says that point is drawn on the canvas (a central point
        # with no other within 4 pixels, so that the click can only mean it)
        text = _run_in_new_cell(page, (
            "import numpy as np; xy = explorer.ax.transData.transform(explorer.coords); "
            "gap = np.linalg.norm(xy[:, None] - xy[None], axis=-1); np.fill_diagonal(gap, np.inf); "
            "i = int(np.argmin(np.where(gap.min(1) > 4, np.abs(xy - np.median(xy, 0)).sum(1), np.inf))); "
            "print('POINT', i, xy[i, 0], explorer.figure.bbox.height - xy[i, 1], explorer.figure.bbox.width)"))
        _, index, x, y, width = re.search(r"POINT (\S+) (\S+) (\S+) (\S+)", text)[0].split()
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        scale = box["width"] / float(width)  # CSS pixels per figure pixel
        lassoed = _gallery(page)
        page.mouse.click(box["x"] + float(x) * scale, box["y"] + float(y) * scale, button="right")
        sync_api.expect(caption).to_contain_text(f"sample {index} and its 7 nearest neighbours", timeout=60_000)
        _idle(page)
        assert _gallery(page) != lassoed  # the gallery now shows the picked sample and its neighbours
        assert caption.inner_text().count("#") == 8  # the sample and its 7 neighbours, named
        canvas.evaluate("e => e.scrollIntoView({block: 'center'})")
        page.screenshot(path=str(shots / "explorer_pick.png"))
        browser.close()
