"""Headless Chromium for the tests that look at a page (Debian's chromium driven by Playwright; never downloaded)."""
import shutil


def chromium_path() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

NO_BROWSER = "no headless Chromium: `apt-get install chromium` and `pip install playwright` (.ci/run does both)"
