"""Evaluation sets: a folder with `evalset.yaml` and the reference images it lists.

    name: my-set
    cases:
      - id: astronaut-waves            # unique; letters, digits, '-', '_', '.'
        prompt: An astronaut waves at the camera inside a space station.
        category: human                # human | animal | cartoon | object | multi-subject
        references: [images/astronaut.png]   # 1..model.max_references paths inside the folder
        subjects: [astronaut]          # optional: the grounding term of each reference
        seed: 0                        # optional: noise seed (default eval.seed)

`load_eval_set` validates everything up front and reports every problem at once, each with the line of
evalset.yaml it is on. `init_builtin` writes the embedded default set from scikit-image's bundled photographs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kaleido.eval.s2v import CATEGORY_TERMS

CATEGORIES = ("human", "animal", "cartoon", "object", "multi-subject")
FILENAME = "evalset.yaml"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CASE_KEYS = {"id", "prompt", "category", "references", "subjects", "seed"}


class EvalSetError(ValueError):
    """The eval set is missing or invalid; the message lists every problem and the file it is in."""


@dataclass(frozen=True)
class EvalCase:
    id: str
    prompt: str
    category: str
    references: tuple[Path, ...]  # absolute, inside the set's folder
    reference_names: tuple[str, ...]  # as written in evalset.yaml
    subjects: tuple[str, ...]  # grounding term per reference
    seed: int

    def fingerprint(self) -> str:
        """Changes when anything that affects this case's video or scores changes (images by content)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.prompt, self.category, list(self.subjects), self.seed]).encode())
        for path in self.references:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class EvalSet:
    root: Path
    name: str
    cases: tuple[EvalCase, ...]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for case in self.cases:
            digest.update(f"{case.id}:{case.fingerprint()};".encode())
        return digest.hexdigest()[:16]

    def categories(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for case in self.cases:
            counts[case.category] = counts.get(case.category, 0) + 1
        return counts


def _check_image(path: Path, name: str, max_pixels: int | None) -> str | None:
    """The problem with a reference image as the generator would load it (media.load_image), or None."""
    from kaleido.model.media import ImageError, load_image

    try:
        load_image(path, f"reference {name!r}", max_pixels, warn=lambda note: None)
    except ImageError as exc:
        return str(exc)
    return None


def _reference_path(root: Path, name: Any, max_pixels: int | None = None) -> tuple[Path | None, str | None]:
    if not isinstance(name, str) or not name.strip():
        return None, f"reference {name!r} must be a non-empty path string"
    if "\x00" in name:
        return None, f"reference {name!r} contains a NUL character; write a plain relative path"
    if Path(name).is_absolute() or name.startswith("~"):
        return None, f"reference {name!r} is absolute; write it relative to the eval-set folder"
    path = (root / name).resolve()
    if not path.is_relative_to(root):  # '..' or a symlink leaving the folder
        return None, f"reference {name!r} resolves to {path}, outside the eval-set folder {root}"
    if not path.is_file():
        return None, f"reference {name!r} not found (looked for {path})"
    problem = _check_image(path, name, max_pixels)
    return (None, problem) if problem else (path, None)


@dataclass(frozen=True)
class _CaseLines:
    """1-based lines of evalset.yaml: where a case starts and where each of its references is written."""

    case: int | None = None
    references: tuple[int, ...] = ()

    def reference(self, index: int) -> int | None:
        return self.references[index] if index < len(self.references) else self.case


def _case_lines(text: str) -> list[_CaseLines]:
    """The lines of every case and reference, from YAML's node tree (the parsed values carry none)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    cases = next((value for key, value in root.value if getattr(key, "value", None) == "cases"), None)
    if not isinstance(cases, yaml.SequenceNode):
        return []
    found = []
    for node in cases.value:
        references: tuple[int, ...] = ()
        if isinstance(node, yaml.MappingNode):
            value = next((v for k, v in node.value if getattr(k, "value", None) == "references"), None)
            if isinstance(value, yaml.SequenceNode):
                references = tuple(item.start_mark.line + 1 for item in value.value)
            elif value is not None:
                references = (value.start_mark.line + 1,)
        found.append(_CaseLines(node.start_mark.line + 1, references))
    return found


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """`line N: ...` for a YAML error; a NUL byte (or another control character) is named as such."""
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        if exc.character in ("\x00", 0):
            return (f"line {line}: a NUL byte (\\x00): no path or prompt can hold one; remove it (an editor or a "
                    "script that wrote binary data put it there)")
        return f"line {line}: character {exc.character!r} is not allowed in YAML; remove it"
    where = f"line {line}: " if line is not None else ""
    return f"{where}not valid YAML: {exc}"


def _parse_case(root: Path, raw: Any, position: int, max_references: int, default_seed: int,
                errors: list[str], max_pixels: int | None = None, lines: _CaseLines | None = None) -> EvalCase | None:
    lines = lines or _CaseLines()
    line = f"line {lines.case}: " if lines.case else ""  # every problem starts with its line of evalset.yaml
    where = f"{line}case #{position + 1}"
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping with id, prompt, category, references")
        return None
    case_id = raw.get("id")
    if isinstance(case_id, str) and _ID.match(case_id):
        where = f"{line}case {case_id!r} (#{position + 1})"
    else:
        errors.append(f"{where}: id {case_id!r} must be 1-64 letters, digits, '.', '_' or '-' (used as a folder name)")
    before = len(errors)
    unknown = sorted(set(raw) - _CASE_KEYS)
    if unknown:
        errors.append(f"{where}: unknown keys {unknown}; allowed: {', '.join(sorted(_CASE_KEYS))}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        errors.append(f"{where}: prompt must be a non-empty string")
    category = raw.get("category")
    if category not in CATEGORIES:
        errors.append(f"{where}: unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
    references = raw.get("references")
    if isinstance(references, str):
        references = [references]
    paths: list[Path] = []
    if not isinstance(references, list) or not references:
        errors.append(f"{where}: references must list 1 to {max_references} image paths")
        references = []
    elif len(references) > max_references:
        errors.append(
            f"{where}: {len(references)} references, the model takes at most {max_references} "
            "(model.max_references)"
        )
    for index, name in enumerate(references):
        path, problem = _reference_path(root, name, max_pixels)
        if problem:
            at = lines.reference(index)
            errors.append((f"line {at}: " if at else "") + f"{where.removeprefix(line)}: {problem}")
        elif path is not None:
            paths.append(path)
    if category == "multi-subject" and isinstance(references, list) and len(references) < 2:
        errors.append(f"{where}: a multi-subject case needs at least 2 references")
    subjects = raw.get("subjects")
    if subjects is None:
        subjects = [CATEGORY_TERMS.get(str(category), "object")] * len(references)
        if category == "multi-subject":
            errors.append(f"{where}: a multi-subject case must name its subjects (subjects: [term per reference])")
    elif isinstance(subjects, str):
        subjects = [subjects]
    if not isinstance(subjects, list) or not all(isinstance(s, str) and s.strip() for s in subjects):
        errors.append(f"{where}: subjects must be a list of non-empty strings, one per reference")
        subjects = []
    elif len(subjects) != len(references):
        errors.append(f"{where}: {len(subjects)} subjects for {len(references)} references (one term per reference)")
    seed = raw.get("seed", default_seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        errors.append(f"{where}: seed {seed!r} must be a non-negative integer")
    if len(errors) > before or not isinstance(case_id, str) or not _ID.match(case_id):
        return None
    return EvalCase(
        id=case_id,
        prompt=prompt.strip(),
        category=category,
        references=tuple(paths),
        reference_names=tuple(references),
        subjects=tuple(s.strip() for s in subjects),
        seed=int(seed),
    )


def load_eval_set(
    folder: str | Path, max_references: int = 3, default_seed: int = 0, max_pixels: int | None = None
) -> EvalSet:
    """Read and validate `<folder>/evalset.yaml`; EvalSetError lists every problem found.

    Every reference is loaded as generation loads it (media.load_image, at most `max_pixels` =
    media.max_image_pixels), so an image the generator would refuse is refused here, before any model runs.
    """
    if "\x00" in str(folder):  # the OS refuses such a path ("embedded null byte") without saying which
        raise EvalSetError(f"eval-set folder {str(folder)!r} contains a NUL byte; check --eval-set or eval.eval_set in "
                           "params.yaml")
    root = Path(folder).expanduser().resolve()
    spec = root / FILENAME
    if not spec.is_file():
        raise EvalSetError(
            f"{spec}: not found; an eval set is a folder with {FILENAME} (create the built-in one with "
            f"`kaleido eval-set init {folder}`)"
        )
    try:
        text = spec.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = spec.read_bytes().count(b"\n", 0, exc.start) + 1
        raise EvalSetError(f"{spec}: line {line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    except OSError as exc:
        raise EvalSetError(f"{spec}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise EvalSetError(f"{spec}: {_yaml_problem(exc, text)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cases"), list) or not raw["cases"]:
        raise EvalSetError(f"{spec}: expected a mapping with a non-empty 'cases' list")
    errors: list[str] = []
    unknown = sorted(set(raw) - {"name", "description", "cases"})
    if unknown:
        errors.append(f"unknown top-level keys {unknown}; allowed: name, description, cases")
    lines = _case_lines(text)
    cases = [_parse_case(root, item, i, max_references, default_seed, errors, max_pixels,
                         lines[i] if i < len(lines) else None)
             for i, item in enumerate(raw["cases"])]
    seen: dict[str, int] = {}
    for case in cases:
        if case is not None:
            seen[case.id] = seen.get(case.id, 0) + 1
    errors += [f"case id {case_id!r} is used {count} times; ids must be unique" for case_id, count in seen.items()
               if count > 1]
    if errors:
        raise EvalSetError(f"{spec}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    name = str(raw.get("name") or root.name)
    return EvalSet(root=root, name=name, cases=tuple(case for case in cases if case is not None))


# ---- the built-in set -----------------------------------------------------------------------------

BUILTIN_NAME = "kaleido-builtin"
BUILTIN_CASES: tuple[dict[str, Any], ...] = (
    {"id": "astronaut-waves", "category": "human", "references": ["images/astronaut.png"], "subjects": ["astronaut"],
     "prompt": "An astronaut waves at the camera inside a bright space station.", "seed": 0},
    {"id": "cat-garden", "category": "animal", "references": ["images/chelsea.png"], "subjects": ["cat"],
     "prompt": "A tabby cat walks slowly through a sunny garden full of flowers.", "seed": 1},
    {"id": "coffee-cafe", "category": "object", "references": ["images/coffee.png"], "subjects": ["coffee cup"],
     "prompt": "A cup of coffee steams on a wooden table in a quiet cafe.", "seed": 2},
    {"id": "rocket-launch", "category": "object", "references": ["images/rocket.png"], "subjects": ["rocket"],
     "prompt": "A rocket lifts off from the launch pad at dawn.", "seed": 3},
    {"id": "astronaut-and-cat", "category": "multi-subject",
     "references": ["images/astronaut.png", "images/chelsea.png"], "subjects": ["astronaut", "cat"],
     "prompt": "An astronaut plays with a cat in a cozy living room.", "seed": 4},
)


def init_builtin(folder: str | Path, force: bool = False) -> Path:
    """Write the built-in set (scikit-image's astronaut, chelsea, coffee, rocket) into `folder`."""
    from kaleido.samples import export_sample_images

    root = Path(folder)
    spec = root / FILENAME
    if spec.exists() and not force:
        raise EvalSetError(f"{spec} already exists; pass --force to overwrite it")
    export_sample_images(root / "images")
    document = {
        "name": BUILTIN_NAME,
        "description": "Embedded default: scikit-image sample photographs (a person, a cat, two objects) and "
                       "one multi-subject case. No cartoon case: no cartoon image ships offline.",
        "cases": [dict(case) for case in BUILTIN_CASES],
    }
    spec.write_text(yaml.safe_dump(document, sort_keys=False, width=120))
    return spec
