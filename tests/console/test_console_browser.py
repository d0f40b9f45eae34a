"""The web console in a real headless browser (Debian's chromium, through playwright) against a
real broker: a device joined by the simulator appears; an auditor cannot revoke and an operator
can; an alert shows up and is acknowledged; the audit trail verifies. Screenshots are kept under
``var/artifacts/console`` (or ``$JITP_ARTIFACTS``)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from device_sim import Target, create_fleet, run_storm
from jitp.config import AlertsConfig, MetricsConfig
from jitp.console import auth
from jitp.trust import Role
from tests.broker_plugins.test_observability_e2e import rogue_connects
from tests.helpers import BrokerThread, Pki, client_context, test_config, wait_until

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("JITP_ARTIFACTS", ROOT / "var" / "artifacts")) / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "chromium is not installed: make console-deps (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    config = test_config(
        tmp_path,
        pki,
        metrics=MetricsConfig(bind="127.0.0.1:0", refresh_interval=3600, console=True),
        alerts=AlertsConfig(burst_refusals=5),
    )
    b = BrokerThread(config).start()
    try:
        b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        yield b
    finally:
        b.stop()


def token(node: BrokerThread, name: str, role: Role) -> str:
    key = auth.ensure_key(node.config.keys_dir / auth.KEY_FILE)
    return auth.make_token(key, name=name, role=role, expires=datetime.now(UTC) + timedelta(hours=1))


def login(browser: Browser, node: BrokerThread, name: str, role: Role) -> Page:
    page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    page.goto(f"http://127.0.0.1:{node.server.metrics_port}/console/")
    assert page.url.endswith("/console/login")  # not logged in: the login page
    page.fill("input[name=token]", token(node, name, role))
    page.click("button[type=submit]")
    page.wait_for_url("**/console/")
    return page


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_console_devices_roles_alerts_and_audit(
    browser: Browser, node: BrokerThread, pki: Pki, tmp_path: Path
) -> None:
    n = 400
    fleet = create_fleet(pki.layout.dir, n, tmp_path / "fleet", prefix="web-")
    target = Target("127.0.0.1", node.port, ca=pki.layout.root_cert)
    operator = login(browser, node, "olga", Role.OPERATOR)
    with ThreadPoolExecutor(1) as pool:  # playwright's sync API holds this thread's event loop
        storm = pool.submit(asyncio.run, run_storm(target, fleet, concurrency=10))
        assert wait_until(lambda: len(node.devices()) >= 40, 30), "the storm did not start"
        operator.reload()
        shot(operator, "overview-during-storm")
        report = storm.result(120)
    assert report.joined == n, report.table()
    rogue_connects(node.port, client_context(pki, pki.identity("web-rogue", issuer=pki.other_ca())), 8)
    assert wait_until(lambda: any(e.draft.action == "alert" for e in node.audit()), 5), "no refusal burst"

    # the overview after the storm, the device the simulator joined
    operator.reload()
    assert operator.inner_text("#card-devices b") == str(n)
    assert operator.locator("#rate rect").count() == 30
    shot(operator, "overview")
    operator.goto(f"http://127.0.0.1:{node.server.metrics_port}/console/devices?q=web-00007")
    operator.click("text=web-00007")
    assert "active" in operator.inner_text("main")
    shot(operator, "device")

    # an auditor may read but not revoke, even by going to the confirmation itself
    auditor = login(browser, node, "aaron", Role.AUDITOR)
    auditor.goto(f"http://127.0.0.1:{node.server.metrics_port}/console/devices/web-00007")
    assert auditor.is_disabled("button:has-text('revoke')")
    auditor.goto(
        f"http://127.0.0.1:{node.server.metrics_port}/console/confirm?action=devices.revoke&device_id=web-00007"
    )
    auditor.click("#confirm")
    assert "auditor may not run devices.revoke" in auditor.inner_text("#result")
    assert str(node.call(node.registry().get_device("web-00007")).status) == "active"

    # the operator revokes, after confirming
    operator.goto(f"http://127.0.0.1:{node.server.metrics_port}/console/devices/web-00007")
    operator.click("#devices-revoke")
    operator.fill("input[name=reason]", "stolen")
    operator.click("#confirm")
    assert operator.inner_text("#result") == "web-00007: now revoked"
    assert str(node.call(node.registry().get_device("web-00007")).status) == "revoked"

    # the refusal burst is on the alerts page; the operator acknowledges it
    operator.goto(f"http://127.0.0.1:{node.server.metrics_port}/console/alerts")
    assert "refusal_burst" in operator.inner_text("main")
    shot(operator, "alerts")
    operator.click("button:has-text('acknowledge')")
    operator.click("#confirm")
    assert "now acknowledged" in operator.inner_text("#result")

    # the auditor verifies the audit trail (the same check as `jitp audit verify`)
    auditor.goto(f"http://127.0.0.1:{node.server.metrics_port}/console/audit")
    auditor.click("#verify")
    auditor.click("#confirm")
    assert auditor.inner_text("#result").startswith("audit trail intact:")
    shot(auditor, "audit")
    commands = [
        (e.draft.actor, e.draft.details["command"], e.draft.details["allowed"])
        for e in node.audit()
        if e.draft.action == "console-command"
    ]
    assert ("auditor:aaron", "devices.revoke", "false") in commands
    assert ("operator:olga", "devices.revoke", "true") in commands


def test_the_console_refuses_without_a_valid_token(browser: Browser, node: BrokerThread) -> None:
    page = browser.new_context().new_page()
    page.goto(f"http://127.0.0.1:{node.server.metrics_port}/console/alerts")
    assert page.url.endswith("/console/login")
    page.fill("input[name=token]", token(node, "olga", Role.OPERATOR)[:-4] + "AAAA")
    page.click("button[type=submit]")
    assert "not a valid console token" in page.inner_text("main")
