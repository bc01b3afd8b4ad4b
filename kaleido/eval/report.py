"""The HTML report of an evaluation: one self-contained file (images embedded as JPEG data URIs).

Shows the model, the eval set, the generation settings, which backbone computed each metric (the
motion-smoothness interpolator and the text metric are named, and a CLIP stand-in for ViCLIP is
flagged), overall and per-category scores, the gate rule, and per case the references, a strip of
frames (full contact sheet and video linked) and the scores.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from kaleido.eval.metrics import METRICS
from kaleido.platform.files import write_text_atomic

if TYPE_CHECKING:
    from kaleido.config.schema import GateConfig

THUMBNAIL = 128

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Kaleido evaluation: {{ doc.model.ref }} on {{ doc.eval_set.name }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fff4d6; border: 1px solid #e0b000; padding: 0.6em; margin: 1em 0; }
.case { border-top: 2px solid #888; margin-top: 1.5em; padding-top: 0.5em; }
.refs img { margin-right: 6px; border: 1px solid #ddd; }
.strip { max-width: 100%; border: 1px solid #ddd; }
small { color: #666; }
</style></head><body>
<h1>Kaleido evaluation</h1>
<table>
<tr><th>model</th><td>{{ doc.model.ref }}{% if doc.model.get('registry') %} (registry {{ doc.model.registry.name }}
 version {{ doc.model.registry.version }}){% endif %}<br><small>{{ doc.model.identity }}</small></td></tr>
<tr><th>eval set</th><td>{{ doc.eval_set.name }}: {{ doc.eval_set.cases }} cases
 ({% for c, n in doc.eval_set.categories.items() %}{{ c }} {{ n }}{% if not loop.last %}, {% endif %}{% endfor %})
 <br><small>{{ doc.eval_set.path }} &middot; fingerprint {{ doc.eval_set.fingerprint }}</small></td></tr>
<tr><th>settings</th><td>{% for k, v in doc.settings.items() %}{{ k }}={{ v }}{% if not loop.last %},
 {% endif %}{% endfor %}</td></tr>
<tr><th>created</th><td>{{ doc.created }}{% if doc.get('mlflow') %} &middot; MLflow run {{ doc.mlflow.run_id }}
 ({{ doc.mlflow.experiment }}){% endif %}</td></tr>
</table>
{% if doc.get("text_metric") and doc.text_metric.key == "clip_text_score" %}
<div class="warn"><b>Text alignment is the CLIP image-text score, not ViCLIP.</b> No ViCLIP weights were given
(eval.models.viclip), so the prompt alignment column is {{ doc.text_metric.label }}. It is not comparable with the
paper's ViCLIP score.</div>
{% endif %}

<h2>Scores</h2>
<table>
<tr><th>metric</th><th>overall</th>{% for c in categories %}<th>{{ c }}</th>{% endfor %}</tr>
{% for key in keys %}<tr><td>{{ titles[key] }} <small>({{ key }})</small></td>
<td class="num"><b>{{ fmt(doc.overall.get(key)) }}</b></td>
{% for c in categories %}<td class="num">{{ fmt(doc.per_category[c].get(key)) }}</td>{% endfor %}</tr>
{% endfor %}
<tr><td><small>cases</small></td><td class="num">{{ doc.counts.cases }}</td>
{% for c in categories %}<td class="num">{{ doc.counts[c] }}</td>{% endfor %}</tr>
</table>

<h2>Backbones</h2>
<table>
<tr><th>metric</th><th>computed with</th><th>definition</th></tr>
{% for key in keys %}<tr><td>{{ titles[key] }}</td><td>{{ doc.backbones.get(key, "") }}</td>
<td><small>{{ definitions[key] }}</small></td></tr>{% endfor %}
</table>

<h2>Promotion gate</h2>
<p>{{ rule }}</p>

<h2>Cases</h2>
{% for case in cases %}
<div class="case" id="{{ case.id }}">
<h3>{{ case.id }} <small>{{ case.category }} &middot; seed {{ case.seed }}</small></h3>
<p>{{ case.prompt }}<br><small>subjects: {{ case.subjects | join(", ") }}</small></p>
{% if case.prompt_truncation %}<p class="warn">&#9888; the prompt has {{ case.prompt_truncation.tokens }} tokens;
 the model read the first {{ case.prompt_truncation.kept }}, dropping: &ldquo;{{ case.prompt_truncation.dropped_text
 }}&rdquo;</p>{% endif %}
<div class="refs">{% for ref in case.ref_images %}<img src="{{ ref.src }}" alt="{{ ref.name }}"
 title="{{ ref.name }}">{% endfor %}</div>
{% if case.strip %}<p><img class="strip" src="{{ case.strip }}" alt="frames of {{ case.id }}"></p>{% endif %}
<p><a href="cases/{{ case.id }}/video.mp4">video.mp4</a> &middot;
 <a href="cases/{{ case.id }}/sheet.png">every frame (contact sheet)</a></p>
<table><tr>{% for key in keys %}<th>{{ titles[key] }}</th>{% endfor %}</tr>
<tr>{% for key in keys %}<td class="num">{{ fmt(case.metrics.get(key)) }}</td>{% endfor %}</tr></table>
{% if case.s2v %}<small>S2V: subject found in {{ fmt(case.s2v.detection_rate) }} of scored frames
 {{ case.s2v.frames }}; references grounded: {{ case.s2v.references_found }}</small>{% endif %}
</div>
{% endfor %}
</body></html>
"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.4f}"


def _data_uri(path: Path, max_side: int | None = None) -> str | None:
    """The image as an embedded JPEG (quality 85): a few KB per picture keeps 400-case reports small."""
    from kaleido.model.media import ImageError, load_image

    if not path.is_file():
        return None
    try:  # the same loader as generation: a phone photo shows upright, a 16-bit one scaled
        image = load_image(path, "report image", warn=lambda note: None)
    except ImageError:
        return None
    if max_side:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def render_report(document: dict[str, Any], out_dir: Path, gate: GateConfig) -> str:
    """The report's HTML; images are read from `out_dir` (strips) and the eval-set folder (references)."""
    from kaleido.eval.gate import rule_text

    root = Path(document["eval_set"]["path"])
    keys = [key for key in METRICS if key in document["overall"]]
    cases = []
    for result in document["cases"]:
        refs = [{"name": name, "src": _data_uri(root / name, THUMBNAIL)} for name in result["references"]]
        cases.append({
            **result,
            "ref_images": [ref for ref in refs if ref["src"]],
            "strip": _data_uri(out_dir / "cases" / result["id"] / "strip.png"),
            "s2v": result.get("details", {}).get("s2v"),
            "prompt_truncation": result.get("prompt_truncation"),
        })
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(
        doc=document,
        keys=keys,
        titles={key: METRICS[key].title for key in METRICS},
        definitions={key: METRICS[key].description for key in METRICS},
        categories=list(document["per_category"]),
        cases=cases,
        rule=rule_text(gate),
        fmt=_fmt,
    )


def write_report(document: dict[str, Any], path: Path, gate: GateConfig) -> Path:
    path = Path(path)
    write_text_atomic(path, render_report(document, path.parent, gate))
    return path
