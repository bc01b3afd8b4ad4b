"""The curation planner (kaleido.data.plan, footprint): counts against published figures, fits and refusals, GPU
placement of local workers (fake device ids: no GPU needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_PARAMS

from kaleido.config.schema import validate_params
from kaleido.data.footprint import model_components
from kaleido.data.plan import (
    STAGE_OF,
    CurationPlanError,
    Workload,
    check_launch,
    describe,
    launch_devices,
    plan_curation,
    seconds_per_call,
)

PROD_PARAMS = REPO_PARAMS.parent / "k8s" / "overlays" / "prod" / "params.yaml"


def _params(path: Path, tmp_path: Path, **overrides: Any) -> Any:
    from kaleido.config.schema import set_dotted

    raw = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    return validate_params(raw, base_dir=tmp_path)  # model folders absent: the published architectures


def test_parameter_counts_match_published_figures(tmp_path: Path) -> None:
    """Meta-device builds against the released files' sizes and the model cards (not against our own code)."""
    prod = _params(PROD_PARAMS, tmp_path)

    def count(key: str, name: str) -> int:
        return next(c.parameters for c in model_components(prod, key) if c.name == name)

    # sam_vit_h_4b8939.pth: 2,564,550,879 bytes of fp32 weights (+ a small pickle header)
    assert count("sam", "SAM vit_h") == pytest.approx(2_564_550_879 / 4, rel=2e-3)
    # FLUX.1-dev / Fill-dev: "a 12 billion parameter rectified flow transformer" (model cards)
    assert count("flux_redux", "FLUX.1-dev transformer") == pytest.approx(12e9, rel=0.01)
    assert count("flux_fill", "FLUX.1 Fill transformer") == pytest.approx(12e9, rel=0.01)
    # FLUX.1-dev/text_encoder_2: two bf16 safetensors shards, 9.52 GB in all (T5 v1.1 XXL encoder)
    assert count("flux_fill", "T5-XXL encoder") * 2 == pytest.approx(9.52e9, rel=0.01)
    # OpenAI CLIP ViT-B/32: 151M parameters (open_clip's pretrained table / the CLIP paper's model card)
    assert count("clip", "CLIP ViT-B-32") == pytest.approx(151.3e6, rel=0.01)
    # grounding-dino-base (HF model card): 233M parameters
    assert count("grounding_dino", "Grounding DINO") == pytest.approx(233e6, rel=0.01)
    # the bf16 set a worker-per-GPU would hold: ~59 GB of FLUX (Fill + dev + Redux), as the issue measured
    flux = sum(c.bytes for key in ("flux_fill", "flux_redux") for c in model_components(prod, key))
    assert 57e9 < flux < 60e9


def test_flux_seconds_follow_the_public_figure(tmp_path: Path) -> None:
    at_1024 = _params(PROD_PARAMS, tmp_path, **{"data.ingest.height": 1024, "data.ingest.width": 1024,
                                                 "data.references.inpaint_steps": 28})
    assert seconds_per_call(at_1024, "flux_fill") == pytest.approx(3.0)  # ~6 s on a 4090, ~2x on an H100
    prod = _params(PROD_PARAMS, tmp_path)  # 480x832 frames: 30x52 = 1560 image tokens
    assert seconds_per_call(prod, "flux_fill") == pytest.approx(3.0 * 1560 / 4096)


def test_prod_plan_fits_and_pools_cost_less_than_a_worker_per_gpu(tmp_path: Path) -> None:
    prod = _params(PROD_PARAMS, tmp_path)
    assert prod.data.ray_address and prod.data.cluster.gpus == 32
    plan = plan_curation(prod)
    assert plan.layout == "ray pools" and plan.fits, describe(plan)
    pools = {p.key: p for p in plan.pools}
    assert set(pools) == {"vlm", "grounding_dino", "sam", "clip", "face", "flux_fill", "flux_redux"}
    assert pools["flux_fill"].num_gpus == 1.0 and pools["sam"].num_gpus < 1  # small models share a GPU
    # the pools of each stage run (caption, curate, then pair: FLUX) together use no more than the cluster
    for stage in ("caption", "curate", "pair"):
        used = sum(p.actors * p.num_gpus for p in plan.pools if STAGE_OF.get(p.key, "curate") == stage)
        assert 16 < used <= 32 + 1e-9, stage
    # FLUX only for the types the mix uses (inpaint 3/10, redux 1/10) and plates for the cross-paired share
    assert pools["flux_fill"].calls_per_clip_pools < pools["flux_fill"].calls_per_clip_worker / 2
    assert plan.gpu_hours("pools") < plan.gpu_hours("worker") / 1.5
    text = describe(plan)
    assert "plan: fits" in text and "public: SAM paper" in text and "GPU-hours" in text


def test_refusals_name_the_changes_that_fit(tmp_path: Path) -> None:
    prod = _params(PROD_PARAMS, tmp_path)
    # a worker per GPU on prod: the whole set (~78 GB) does not fit one 80 GB GPU
    local = _params(PROD_PARAMS, tmp_path, **{"data.ray_address": None})
    plan = plan_curation(local)
    assert not plan.fits and any("data.ray_address" in fix for fix in plan.fixes), describe(plan)
    # FLUX in fp32 does not fit an actor on one GPU: bfloat16 named
    fp32 = _params(PROD_PARAMS, tmp_path, **{"data.models.flux_dtype": "float32"})
    plan = plan_curation(fp32)
    assert not plan.fits and any("flux_dtype: bfloat16" in fix for fix in plan.fixes)
    # too few GPUs for one actor of every pool of a stage (pair: FLUX Fill 1 + Redux 0.5)
    assert plan_curation(prod, gpus=2).fits
    plan = plan_curation(prod, gpus=1)
    assert not plan.fits and any(fix.startswith("data.cluster.gpus: 2") for fix in plan.fixes), describe(plan)
    with pytest.raises(CurationPlanError, match=r"kaleido curate: .* 1 GPU\(s\) .*data.cluster.gpus"):
        check_launch(prod, stage="kaleido curate", gpus=1)
    # small GPUs: 24 GB holds no FLUX actor
    plan = plan_curation(prod, gpu_memory_gb=24)
    assert not plan.fits and "FLUX.1 Fill needs about" in "\n".join(plan.problems)


def test_local_workers_get_one_gpu_each_or_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # fake ids: nothing here touches a GPU
    small = {"data.models.device": "cuda", "data.models.flux_fill": None, "data.models.flux_redux": None,
             "data.models.sam_type": "vit_b", "data.cluster.gpus": "auto"}
    params = _params(PROD_PARAMS, tmp_path, **{**small, "data.ray_address": None, "data.workers": 4})
    assert launch_devices(params, "kaleido curate") == ("4", "5", "6", "7")
    eight = _params(PROD_PARAMS, tmp_path, **{**small, "data.ray_address": None, "data.workers": 8})
    with pytest.raises(CurationPlanError, match=r"data.workers is 8 but the run gets 4 GPU.*data.workers: 4"):
        launch_devices(eight, "kaleido curate")
    # the embedded default: models on the CPU, nothing to place, nothing built
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    embedded = _params(REPO_PARAMS, tmp_path)
    assert launch_devices(embedded, "kaleido curate") == ()


def record_device(ctx: Any) -> dict[str, Any]:
    """Shard fn (pickled by name into spawn workers): which GPU this worker sees."""
    import os
    import time

    time.sleep(1.0)  # hold the worker so that every shard lands on a different one
    (ctx.work_dir / "device.json").write_text(json.dumps({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    return {}


def test_four_workers_on_four_gpus_use_four_distinct_gpus(tmp_path: Path, data_params: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from kaleido.data.shards import ShardSpec, run_shards

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawn workers import this module by name
    monkeypatch.setenv("PYTHONPATH", f"{Path(__file__).parent}:{__import__('os').environ.get('PYTHONPATH', '')}")
    params = data_params(tmp_path / "data", {"data.workers": 4})
    specs = [ShardSpec(i, (f"item{i}",)) for i in range(4)]
    import test_curation_plan

    result = run_shards("placement", specs, test_curation_plan.record_device, params, progress=False,
                        gpus=("0", "1", "2", "3"))
    assert not result.failed, [o.error for o in result.failed]
    seen = [json.loads((folder / "device.json").read_text())["gpu"] for folder in result.shard_dirs()]
    assert sorted(seen) == ["0", "1", "2", "3"]  # before: every worker saw "0,1,2,3" and used GPU 0


def test_cli_plan_for_the_paper_scale(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kaleido.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["curate", "--plan", "--params", str(PROD_PARAMS), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output[result.output.index("{"):])
    assert plan["fits"] and plan["workload"]["clips"] == 2_000_000 and plan["gpus"] == 32
    assert 500 < plan["gpu_hours"]["pools"] < plan["gpu_hours"]["worker_per_gpu"]
    result = runner.invoke(app, ["curate", "--plan", "--params", str(PROD_PARAMS), "--gpus", "1",
                                 "--source-hours", "100"])
    assert result.exit_code == 1 and "plan: does NOT fit" in result.output and "data.cluster.gpus" in result.output
    assert "42,353 clips" in result.output  # 100 h / 8.5 s (the middle of 2-15 s clips)
    assert Workload().clips == 2_000_000


def test_flux_calls_the_planner_counts_are_what_the_pair_stage_makes(tmp_path: Path) -> None:
    """2,000 clips of 2 subjects, 10 clips per source, one dataset shard, the paper's mix and cross ratio: the FLUX
    calls the pair stage makes (counted by its builder and by the counting stand-ins) against the planner's
    calls_per_clip. Redux is exact (the mix is exact per shard); inpaint references and plates are expectations
    (the type and cross draws are independent hashes; donors are consistent-hash draws: plan.donor_share)."""
    from kaleido.config.schema import DataConfig
    from kaleido.data.generated import FluxModels
    from kaleido.data.pairing import pair_samples
    from kaleido.data.plan import calls_per_clip
    from kaleido.data.synthetic import MirrorVariator, TextureInpainter, curation_frame, curation_results

    clips = 2000
    results = curation_results(tmp_path, clips, subjects=2, clips_per_source=10)
    flux = FluxModels(TextureInpainter(), MirrorVariator())
    stats: dict = {}
    pair_samples(results, DataConfig(), 0, flux=flux, frames=curation_frame, data_root=tmp_path, stats=stats)
    made = stats["flux_calls"]
    assert made["inpaint"] + made["plate"] == flux.fill.calls and made["redux"] == flux.redux.calls
    prod = _params(PROD_PARAMS, tmp_path)
    work = Workload(clips=clips, subjects_per_clip=2.0, yield_share=1.0)
    planned_fill = calls_per_clip(prod, "flux_fill", work, only_needed_types=True) * clips
    planned_redux = calls_per_clip(prod, "flux_redux", work, only_needed_types=True) * clips
    assert made["redux"] == planned_redux == 400  # 2 subjects x 200 redux samples
    assert flux.fill.calls == pytest.approx(planned_fill, rel=0.05)  # 720 expected inpaint + ~683 plates
    assert made["plate"] == pytest.approx(clips * 0.3417, rel=0.06)  # donor_share(0.72); uniform draws: 0.513
    # every type built for every subject, a plate for every clip: what the worker-per-GPU baseline counts
    assert calls_per_clip(prod, "flux_fill", work, only_needed_types=False) * clips == 3 * clips


@pytest.mark.parametrize("args, option", [
    (["--gpu-memory-gb", "inf"], "--gpu-memory-gb"), (["--gpu-memory-gb", "0"], "--gpu-memory-gb"),
    (["--source-hours", "inf"], "--source-hours"), (["--source-hours", "0"], "--source-hours"),
    (["--subjects-per-clip", "nan"], "--subjects-per-clip"), (["--subjects-per-clip", "-2"], "--subjects-per-clip"),
    (["--source-hours", "10", "--clip-seconds", "0"], "--clip-seconds"),
    (["--source-hours", "10", "--clip-seconds", "-1"], "--clip-seconds"), (["--clip-seconds", "5"], "--clip-seconds"),
    (["--clips", "99999999999999999999999"], "--clips"), (["--clips", "0"], "--clips"), (["--gpus", "-1"], "--gpus"),
    (["--yield-share", "nan"], "--yield-share"), (["--yield-share", "1.5"], "--yield-share"),
])
def test_cli_plan_refuses_numbers_out_of_range_in_one_line(args: list[str], option: str) -> None:
    """Before: NaN / infinity were tracebacks; 0, negatives and 10^23 clips printed a plan with exit 0."""
    from typer.testing import CliRunner

    from kaleido.cli import app

    result = CliRunner().invoke(app, ["curate", "--plan", "--params", str(PROD_PARAMS), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {option}") and "Traceback" not in result.output


def test_workload_and_plan_refuse_non_finite_numbers(tmp_path: Path) -> None:
    for bad in ({"clips": 0}, {"subjects_per_clip": float("nan")}, {"yield_share": -0.1},
                {"cpu_seconds_per_clip": float("inf")}):
        with pytest.raises(ValueError, match=f"Workload.{next(iter(bad))}"):
            Workload(**bad)
    prod = _params(PROD_PARAMS, tmp_path)
    with pytest.raises(CurationPlanError, match="the GPU memory given is inf"):
        plan_curation(prod, gpu_memory_gb=float("inf"))
    with pytest.raises(CurationPlanError, match="--gpus is -1"):
        plan_curation(prod, gpus=-1, gpus_from="--gpus")


def test_small_gpus_are_refused_with_the_memory_that_fits(tmp_path: Path) -> None:
    """24 GB: the VLM and both FLUX pools hold on no GPU; before, no change was named."""
    prod = _params(PROD_PARAMS, tmp_path)
    plan = plan_curation(prod, gpu_memory_gb=24, memory_from="--gpu-memory-gb")
    pools = {p.key: p for p in plan.pools}
    need = max(pools[key].memory_gb for key in ("vlm", "flux_fill", "flux_redux")) / 0.9
    text = describe(plan)
    assert not plan.fits and "changes that fit:" in text and "(24 GB x 0.9: --gpu-memory-gb)" in text, text
    assert any(fix.startswith(f"GPUs of at least {math.ceil(need)} GB") for fix in plan.fixes), plan.fixes
    assert plan_curation(prod, gpu_memory_gb=math.ceil(need)).fits  # the size named does fit
    assert {"data.caption.captioner: sidecar", "data.models.flux_fill: null"} <= {f.split(" (")[0] for f in plan.fixes}
    # every refusal names a change: local workers on small GPUs, no GPU, too few GPUs
    local = _params(PROD_PARAMS, tmp_path, **{"data.ray_address": None})
    for refused in (plan_curation(local, gpu_memory_gb=24), plan_curation(prod, gpus=0), plan_curation(prod, gpus=1)):
        assert not refused.fits and refused.fixes, describe(refused)


def test_a_gpu_count_names_where_it_came_from(tmp_path: Path) -> None:
    prod = _params(PROD_PARAMS, tmp_path)
    plan = plan_curation(prod, gpus=0, gpus_from="--gpus")
    assert "--gpus is 0" in plan.problems[0] and "data.cluster.gpus" not in plan.problems[0], plan.problems
    zero = _params(PROD_PARAMS, tmp_path, **{"data.cluster.gpus": 0})
    assert "data.cluster.gpus is 0" in plan_curation(zero).problems[0]


def test_every_figure_says_what_it_includes(tmp_path: Path) -> None:
    """Before: the worker row printed 6.30 GPU-s/clip and 4,318 GPU-hours, which silently held 1.48 CPU-s/clip."""
    prod = _params(PROD_PARAMS, tmp_path)
    plan = plan_curation(prod, workload=Workload(cpu_seconds_per_clip=1.5))
    data = plan.to_dict()
    for name in ("pools", "worker_per_gpu"):
        seconds = data["gpu_seconds_per_clip"][name]
        assert seconds["total"] == pytest.approx(seconds["model_calls"] + seconds["held_for_cpu_stages"], abs=1e-3)
        assert data["gpu_hours"][name] == pytest.approx(2_000_000 * seconds["total"] / 3600, rel=1e-3)
        assert data["wall_hours"][name] == pytest.approx(data["gpu_hours"][name] / 32, rel=1e-3)
    assert data["gpu_seconds_per_clip"]["worker_per_gpu"]["held_for_cpu_stages"] == 1.5
    assert data["gpu_seconds_per_clip"]["pools"]["held_for_cpu_stages"] == 0.0
    calls = plan.gpu_seconds_per_clip("worker")
    assert f"{calls:.2f} GPU-s/clip of model calls + 1.50 s/clip held" in describe(plan)


def test_counting_clip_prints_no_random_weights_warning(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kaleido.data.footprint import clip

    handlers = list(logging.getLogger().handlers)
    with caplog.at_level(logging.WARNING):
        assert clip(None, "ViT-B-32")[0].parameters > 0
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    assert logging.getLogger().handlers == handlers  # no basicConfig handler left behind
