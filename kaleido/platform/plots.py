"""`dvc plots show` without the internet: an HTML template with the chart library inlined.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a public CDN, so offline its loss curves stay blank.
DVC takes a page template of ours (`plots.html_template`, read from the `.dvc` folder); this one holds the three
libraries as one inline script, bundled by the `vl-convert-python` package (a registry package; nothing fetched at
run time, nothing vendored in git). `write_offline_template` writes `.dvc/offline-plots.html` and sets the key in
`.dvc/config.local` (this machine's DVC config, not committed): a fresh clone keeps DVC's default until `make setup`
runs it. Vega-Lite 5, the major version of DVC's own plot templates.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TEMPLATE_NAME = "offline-plots.html"
VEGA_LITE = "5.21"
_MARK = "kaleido offline plots"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {mark}: Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {embed}, inlined by vl-convert-python {package} -->
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class PlotsTemplateError(RuntimeError):
    """The offline template cannot be written; the message says why and what to do."""


def offline_page() -> str:
    """The page: DVC's template fields `{refresh_tag}` and `{plot_divs}`, the libraries inline, no `{scripts}` (which
    DVC fills with the CDN tags)."""
    try:
        import vl_convert
    except ImportError:
        raise PlotsTemplateError(
            "vl-convert-python is not installed (requirements.lock has it): run `make setup`"
        ) from None
    from importlib.metadata import version

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    bundle = bundle.replace("</script", "<\\/script")  # the bundle must not close its own tag
    for field in ("{plot_divs}", "{scripts}", "{refresh_tag}"):  # DVC replaces these anywhere in the page
        bundle = bundle.replace(field, field.replace("{", "\\x7b"))
    return PAGE.format(mark=_MARK, vega=vl_convert.get_vega_version(), vega_lite=VEGA_LITE,
                       embed=vl_convert.get_vega_embed_version(), package=version("vl-convert-python"),
                       bundle=bundle)  # fmt: skip


def write_offline_template(repo: Path, dvc: str | None = None) -> Path:
    """Write `<repo>/.dvc/offline-plots.html` (unless the same page is there) and point `.dvc/config.local`'s
    `plots.html_template` at it; returns the template's path. PlotsTemplateError without a `.dvc` folder."""
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        raise PlotsTemplateError(f"{repo} has no .dvc folder: run this in the repository (or `dvc init` first)")
    page = offline_page()
    template = dvc_dir / TEMPLATE_NAME
    if not template.is_file() or template.read_text(encoding="utf-8") != page:
        tmp = template.with_suffix(".tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(template)
    dvc = dvc or str(Path(sys.executable).with_name("dvc"))
    result = subprocess.run([dvc, "config", "--local", "plots.html_template", TEMPLATE_NAME], cwd=repo,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode:
        raise PlotsTemplateError(f"`dvc config --local plots.html_template` failed: {result.stderr.strip()[-500:]}")
    return template
