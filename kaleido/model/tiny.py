"""Random-weight tiny models in the REAL on-disk formats, built fully offline.

`build_tiny_assets(out_dir)` writes
  transformer/   tiny KaleidoDiT in the Wan2.1 layout (safetensors + WanModel config.json)
  vae/           diffusers AutoencoderKLWan (save_pretrained), latent mean/std calibrated on its own encoder
  text_encoder/  transformers UMT5EncoderModel (save_pretrained), d_model = the tiny DiT's text_dim
  tokenizer/     a sentencepiece unigram model trained here on a built-in corpus, saved as a T5 tokenizer
so every loader in the platform runs unchanged on a laptop CPU. Output is a function of the seed only.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.text_encoder import quiet_hf_progress

# Bump when the assets' layout or contents change: a stale folder is rebuilt, not reused.
TINY_ASSETS_VERSION = 1
MARKER = "kaleido_tiny_assets.json"
PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
VOCAB_SIZE = 640
TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": []}


def _words(text: str, sep: str | None = None) -> list[str]:
    return [word.strip() for word in text.split(sep) if word.strip()]


# Word lists for the tokenizer corpus: prompts about people, animals and objects, like S2V captions.
_PEOPLE = _words(
    "man woman boy girl child baby teenager grandmother grandfather astronaut chef doctor nurse farmer dancer "
    "musician painter sculptor soldier firefighter teacher student scientist athlete skateboarder surfer "
    "cyclist runner climber photographer waiter barista knight princess wizard pirate cowboy detective"
)
_ANIMALS = _words(
    "cat dog kitten puppy horse pony cow sheep goat pig rabbit hamster squirrel fox wolf bear lion tiger "
    "leopard cheetah elephant giraffe zebra hippo rhino camel kangaroo koala monkey gorilla panda penguin "
    "owl eagle hawk parrot flamingo peacock duck goose swan pigeon dolphin whale shark octopus jellyfish "
    "turtle tortoise frog lizard snake crocodile butterfly bee ladybug spider snail"
)
_OBJECTS = _words(
    "robot car bicycle motorcycle scooter truck bus train tram boat sailboat canoe airplane helicopter rocket "
    "guitar piano violin drum trumpet saxophone teapot kettle cup mug glass bowl plate fork spoon vase lamp "
    "candle chair sofa bench table desk clock watch backpack suitcase umbrella camera phone laptop tablet "
    "book notebook pencil bottle basket hat scarf jacket dress sneaker boot ball kite balloon sandwich pizza "
    "burger cake cookie donut apple banana orange strawberry watermelon coffee tea bread cheese flower tree"
)
_ADJECTIVES = _words(
    "young old tall short small tiny huge big happy smiling serious curious sleepy playful fluffy furry "
    "shiny glossy matte red blue green yellow orange purple pink brown white black gray golden silver "
    "wooden metal plastic ceramic glass striped spotted checkered colorful pastel vintage modern futuristic "
    "elegant cheerful grumpy brave gentle clumsy graceful muddy wet dusty rusty sparkling transparent"
)
_ACTIONS = _words(
    "walks runs jumps sits stands dances sings plays reads writes cooks bakes eats drinks sleeps swims "
    "flies climbs rides waves smiles laughs looks turns spins rolls floats glows rests waits hides chases "
    "catches throws kicks pushes pulls carries holds hugs paints draws builds repairs cleans opens closes "
    "explores wanders crawls stretches yawns whispers shouts juggles balances"
)
_PLACES = _words(
    "in a park|on a sandy beach|in a sunny kitchen|in outer space|on a wooden table|in a busy city street|"
    "in a snowy forest|under heavy rain|at sunset|in a bright studio|on a rocky mountain|beside a quiet river|"
    "in a garden full of flowers|inside a cozy living room|in a hot desert|in an old library|"
    "at a crowded train station|on a rooftop at night|in a golden field of wheat|near an ancient castle|"
    "in a neon lit alley|on a frozen lake|inside a glass greenhouse|at a village market|on a foggy pier|"
    "in a classroom|in a hospital corridor|on a racing track|in a bamboo grove|under a starry sky|"
    "in a subway car|on a wooden bridge|in a toy shop|at the bottom of the ocean|in a misty valley",
    "|",
)
_CAMERA = _words(
    "The camera slowly pans to the left.|The camera zooms in on the face.|Soft light falls from a window.|"
    "The scene is filmed in slow motion.|The background is softly blurred.|Warm colors fill the frame.|"
    "A gentle breeze moves the leaves.|The shot is steady and sharp.|The camera tracks the movement.|"
    "Rain drops glisten in the light.|The picture has a cinematic look.|Shadows stretch across the ground.|"
    "The lighting is dramatic and moody.|It is a wide establishing shot.|A close up shows fine details.|"
    "Dust floats in the sunbeams.|The colors are vivid and saturated.|The mood is calm and peaceful.",
    "|",
)
_ADVERBS = _words("slowly quickly happily carefully quietly proudly lazily eagerly gracefully suddenly")


def tokenizer_corpus(seed: int = 0, sentences: int = 800) -> list[str]:
    """A deterministic English corpus of short video captions (people, animals, objects)."""
    rng = random.Random(seed)
    subjects = _PEOPLE + _ANIMALS + _OBJECTS
    corpus = []
    for _ in range(sentences):
        text = f"A {rng.choice(_ADJECTIVES)} {rng.choice(subjects)} {rng.choice(_ADVERBS)} {rng.choice(_ACTIONS)}"
        text += f" {rng.choice(_PLACES)}"
        if rng.random() < 0.5:
            text += f" with a {rng.choice(_ADJECTIVES)} {rng.choice(subjects)}"
        corpus.append(f"{text}. {rng.choice(_CAMERA)}")
    # every word at least once, so no listed word is split into characters only
    corpus.extend(" ".join(words) for words in (_PEOPLE, _ANIMALS, _OBJECTS, _ADJECTIVES, _ACTIONS, _ADVERBS))
    return corpus


def _train_tokenizer(out: Path, seed: int) -> int:
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(seed)),
        model_writer=model,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        hard_vocab_limit=False,  # the corpus decides the final size (a few hundred pieces)
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,  # T5 layout: <pad>=0, </s>=1, <unk>=2, no <s>
        character_coverage=1.0,
        num_threads=1,  # single-threaded training is deterministic
        minloglevel=2,
    )
    out.mkdir(parents=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    # transformers converts the sentencepiece model into a `tokenizers` T5 tokenizer (tokenizer.json)
    tokenizer = T5Tokenizer.from_pretrained(str(out), extra_ids=0, model_max_length=512, local_files_only=True)
    tokenizer.save_pretrained(str(out))
    return len(AutoTokenizer.from_pretrained(str(out), local_files_only=True))


def _write_text_encoder(out: Path, vocab_size: int, d_model: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # as umt5-xxl
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with quiet_hf_progress():
        UMT5EncoderModel(config).eval().save_pretrained(str(out))


def _calibration_clip(seed: int) -> torch.Tensor:
    """[1, 3, 9, 64, 64] in [-1, 1]: smooth moving gradients plus noise (image-like statistics)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, 9)[:, None, None]
    y = torch.linspace(-1, 1, 64)[None, :, None]
    x = torch.linspace(-1, 1, 64)[None, None, :]
    channels = [torch.sin(3 * x + 2 * t + k) * torch.cos(2 * y - t * k) for k in range(3)]
    clip = torch.stack(channels) * 0.7 + 0.2 * torch.randn(3, 9, 64, 64, generator=generator)
    return clip.clamp(-1, 1)[None]


def _write_vae(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_VAE).eval()
    # A random encoder's latents are far from the real Wan VAE's mean/std; calibrate them so the
    # normalised latents the DiT sees are ~unit scale, like with the real VAE.
    with torch.no_grad():
        mu = vae.encode(_calibration_clip(seed)).latent_dist.mode()
    mean = mu.mean(dim=(0, 2, 3, 4))
    std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(
        latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std]
    )
    vae.save_pretrained(str(out))


def _write_transformer(out: Path) -> None:
    from kaleido.model.checkpoint import save_dit

    cfg = dit_config("tiny")
    # Wan2.1 layout: diffusion_pytorch_model.safetensors + a WanModel config.json (with our text_dim)
    save_dit(KaleidoDiT(cfg).eval(), out, "wan", cfg)


def tiny_assets_complete(out_dir: str | Path, seed: int = 0) -> bool:
    """True when `out_dir` holds every part, written by this version with this seed."""
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    if not marker.is_file() or not all((out_dir / part).is_dir() for part in PARTS):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("seed") == seed and info.get("version") == TINY_ASSETS_VERSION


def build_tiny_assets(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny transformer/vae/text_encoder/tokenizer folders under `out_dir`; return `out_dir`.

    Skips the work when `out_dir` is already complete for this seed and version (unless `force`).
    Parts are built in a scratch folder beside `out_dir` and moved in, then the marker is written
    last, so an interrupted build is never mistaken for a complete one.
    """
    out_dir = Path(out_dir).resolve()
    if not force and tiny_assets_complete(out_dir, seed):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    cfg = dit_config("tiny")
    with tempfile.TemporaryDirectory(prefix=".tiny-build-", dir=out_dir) as scratch_name:
        scratch = Path(scratch_name)
        # fork_rng: building assets must not disturb the caller's global RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _write_transformer(scratch / "transformer")
            torch.manual_seed(seed + 1)
            _write_vae(scratch / "vae", seed)
            vocab_size = _train_tokenizer(scratch / "tokenizer", seed)
            torch.manual_seed(seed + 2)
            _write_text_encoder(scratch / "text_encoder", vocab_size, cfg.text_dim)
        for part in PARTS:
            target = out_dir / part
            if target.exists():
                shutil.rmtree(target)
            (scratch / part).rename(target)
    info = {"version": TINY_ASSETS_VERSION, "seed": seed, "vocab_size": vocab_size, "dit": cfg.to_dict()}
    (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
