"""Generation that fits: the memory options and sequence-parallel generation give the same video as the plain
single-device path (on CPU, where the options change placement, not arithmetic)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kaleido.config import load_params

SMALL = {"frames": 5, "height": 32, "width": 48, "steps": 3, "seed": 7, "progress": False}


@pytest.fixture(scope="module")
def params_path(tiny_assets, params_for, tmp_path_factory):
    return params_for(tmp_path_factory.mktemp("memory"), tiny_assets, {
        "generate.frames": 5, "generate.height": 32, "generate.width": 48, "generate.steps": 3, "generate.seed": 7})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("options", [
    {"generate.offload": "blocks"},
    {"generate.text_encoder_device": "cpu", "generate.release_encoders": True},
    {"generate.offload": "blocks", "generate.release_encoders": True},
], ids=["block-offload", "t5-cpu+release", "all"])
def test_memory_options_generate_the_same_video(params_path, reference, options):
    from kaleido.model.generate import S2VPipeline

    plain = S2VPipeline.from_params(load_params(params_path), device="cpu")
    expected = plain("a cat walks", [reference], **SMALL)
    pipe = S2VPipeline.from_params(load_params(params_path, options), device="cpu")
    if options.get("generate.offload") == "blocks":
        from diffusers.hooks import HookRegistry

        assert HookRegistry.check_if_exists_or_initialize(pipe.dit.blocks[0]).hooks  # the offload hooks are on
    got = pipe("a cat walks", [reference], **SMALL)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_two_rank_sequence_parallel_generation_equals_one_device(params_path, reference, tmp_path):
    """`torchrun --nproc-per-node 2 kaleido generate`: Ulysses over 2 gloo ranks, rank 0 writes the video."""
    from kaleido.model.media import read_video

    kaleido = str(Path(sys.executable).with_name("kaleido"))
    args = ["generate", "--prompt", "a cat walks", "--ref", str(reference), "--params", str(params_path)]
    # the single-device run also takes the memory options from the command line (they change placement only)
    memory = ["--offload", "blocks", "--text-encoder-device", "cpu", "--release-encoders"]
    single = subprocess.run([kaleido, *args, *memory, "--out", str(tmp_path / "one.mp4")], capture_output=True,
                            text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    assert ("placement: DiT on cpu (blocks wait on cpu, one at a time on the device), text encoder on cpu, VAE on "
            "cpu, encoders released to cpu after encoding\n") in single.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         kaleido, *args, "--out", str(tmp_path / "two.mp4")], capture_output=True, text=True, env=env)
    assert sp.returncode == 0, (sp.stdout + sp.stderr)[-4000:]
    assert sp.stdout.count("video: ") == 1  # only rank 0 writes
    assert "; Ulysses over 2 ranks" in sp.stdout
    one, two = read_video(tmp_path / "one.mp4").astype(int), read_video(tmp_path / "two.mp4").astype(int)
    assert one.shape == two.shape == (5, 32, 48, 3)
    # fp32 on CPU: the sharded attention sums in another order, ~1e-6 apart before the uint8 conversion
    assert np.abs(one - two).max() <= 2 and np.abs(one - two).mean() < 0.05


def test_sequence_parallel_refuses_heads_it_cannot_split():
    """The tiny DiT has 2 heads: Ulysses over 3 ranks cannot scatter them (checked before sampling, no process
    group needed for the check)."""
    from kaleido.model.dit import KaleidoDiT, dit_config
    from kaleido.train.sequence_parallel import UlyssesSequenceParallel

    parallel = UlyssesSequenceParallel.__new__(UlyssesSequenceParallel)  # no process group: only the check runs
    parallel.size, parallel._handles = 3, []
    with pytest.raises(ValueError, match="does not divide the 2 attention heads"):
        parallel.attach(KaleidoDiT(dit_config("tiny")))
