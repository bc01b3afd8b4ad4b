"""`dvc plots show` offline: the page DVC writes from our template loads no script from the network and carries
Vega itself; headless Chromium, with the network switched off, draws the chart."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def test_dvc_plots_show_offline(tmp_path: Path) -> None:
    from kaleido.platform.plots import TEMPLATE_NAME, write_offline_template

    dvc = str(Path(sys.executable).with_name("dvc"))
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    (repo / "loss.csv").write_text("step,loss\n0,2.0\n1,1.2\n2,0.7\n3,0.5\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{"loss.csv": {"x": "step", "y": "loss"}}]}))
    template = write_offline_template(repo)
    assert template == repo / ".dvc" / TEMPLATE_NAME
    assert "offline-plots.html" in (repo / ".dvc" / "config.local").read_text()
    assert "offline-plots.html" not in (repo / ".dvc" / "config").read_text()  # this machine's setting only
    again = template.stat().st_mtime_ns
    write_offline_template(repo)  # idempotent: the same page is not rewritten
    assert template.stat().st_mtime_ns == again

    shown = subprocess.run([dvc, "plots", "show", "-o", str(tmp_path / "plots")], cwd=repo, capture_output=True,
                           text=True, check=True)  # fmt: skip
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=" not in page, shown.stdout
    assert "window.vegaEmbed" in page and "vegaEmbed(" in page and '"loss"' in page

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return  # the page holds no network script; drawing it needs a browser (`make test` installs one as root)
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network for the page
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         (tmp_path / "plots" / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if not dom.stdout.strip():
        pytest.fail(f"chromium printed no DOM: {dom.stderr[-2000:]}")
    assert "<svg" in dom.stdout or "<canvas" in dom.stdout, dom.stdout[-2000:]  # Vega drew the chart
