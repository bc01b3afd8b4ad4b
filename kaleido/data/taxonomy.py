"""Subject taxonomy and caption matching (paper section 3.2 (2): subject candidates from captions).

The taxonomy (taxonomy.yaml in this package, or `data.caption.taxonomy`) maps synonyms and named
instances to a category and a group. `Taxonomy.match(caption)` scans the caption's words left to
right and, at each position, takes the LONGEST term that fits ("golden retriever" beats
"retriever", "teddy bear" beats "bear"; on equal length the word-for-word match beats one that
needed de-pluralising, so "glasses" is eyewear, not two drinking glasses). Words are compared in
lower case; each caption word also matches the singular forms it may be a plural of (regular
rules plus an irregular table: people, mice, geese, children, wolves, knives, cacti ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kaleido.data.records import SUBJECT_GROUPS, SubjectMatch

# Plurals no suffix rule recovers (and a few Latin/Greek ones); "-men" -> "-man" is a rule below.
IRREGULAR_PLURALS = {
    "people": "person",
    "persons": "person",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "lice": "louse",
    "dice": "die",
    "cacti": "cactus",
    "fungi": "fungus",
    "octopi": "octopus",
    "hippopotami": "hippopotamus",
    "larvae": "larva",
    "antennae": "antenna",
    "passersby": "passerby",
    "brethren": "brother",
    "dwarves": "dwarf",
    "genies": "genie",
    "genii": "genie",
    "axes": "axe",
    "ponies": "pony",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "moose": "moose",
    "bison": "bison",
    "aircraft": "aircraft",
    "species": "species",
    "series": "series",
}

_WORD = re.compile(r"[^\W_]+", re.UNICODE)  # letters and digits; hyphens, apostrophes and spaces split words


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """(lower-case word, start, end) for each word of `text`."""
    return [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(text)]


def singular_forms(word: str) -> list[str]:
    """`word` itself first, then the singulars it may be the plural of (over-generating is harmless:
    a form only counts if it is a taxonomy term)."""
    forms = [word]

    def add(form: str) -> None:
        if form and form not in forms:
            forms.append(form)

    if word in IRREGULAR_PLURALS:
        add(IRREGULAR_PLURALS[word])
    if len(word) > 4 and word.endswith("men"):  # firemen, policemen, fishermen, snowmen
        add(word[:-3] + "man")
    if len(word) > 3 and word.endswith("ies"):  # puppies -> puppy, movies -> movie
        add(word[:-3] + "y")
        add(word[:-1])
    if len(word) > 3 and word.endswith("ves"):  # wolves -> wolf, knives -> knife, curves -> curve
        add(word[:-3] + "f")
        add(word[:-3] + "fe")
        add(word[:-1])
    if len(word) > 3 and word.endswith("es"):  # boxes, buses, churches, tomatoes (and horses -> below)
        add(word[:-2])
        if word.endswith("zzes"):  # quizzes -> quiz
            add(word[:-3])
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):  # dogs, horses, cats
        add(word[:-1])
    if len(word) > 3 and word.endswith("ae"):  # larvae-like Latin plurals
        add(word[:-1])
    return forms


@dataclass(frozen=True)
class Category:
    name: str
    group: str
    terms: tuple[str, ...]  # synonyms and instances, the name first


class Taxonomy:
    """Categories with their terms, and a word trie for longest-match caption scanning."""

    def __init__(self, categories: Iterable[Category], source: str = "<memory>") -> None:
        self.source = source
        self.categories: dict[str, Category] = {}
        self._trie: dict[str, Any] = {}
        owners: dict[tuple[str, ...], str] = {}
        for category in categories:
            if category.group not in SUBJECT_GROUPS:
                raise ValueError(
                    f"{source}: category {category.name!r} has group {category.group!r}; "
                    f"allowed: {', '.join(SUBJECT_GROUPS)}"
                )
            if category.name in self.categories:
                raise ValueError(f"{source}: category {category.name!r} is defined twice")
            self.categories[category.name] = category
            for term in category.terms:
                words = tuple(word for word, _, _ in tokenize(term))
                if not words:
                    raise ValueError(f"{source}: category {category.name!r} has an empty term {term!r}")
                if owners.get(words) == category.name:  # "scooby-doo" and "scooby doo" are one term
                    continue
                if words in owners:
                    raise ValueError(
                        f"{source}: term {term!r} is in both {owners[words]!r} and {category.name!r}; "
                        "a term must name one category"
                    )
                owners[words] = category.name
                node = self._trie
                for word in words:
                    node = node.setdefault(word, {})
                node["$"] = category.name

    @classmethod
    def from_mapping(cls, raw: Any, source: str = "<memory>") -> Taxonomy:
        """From {group: {category: [terms]}} (the taxonomy.yaml layout)."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a mapping of groups ({', '.join(SUBJECT_GROUPS)})")
        categories = []
        for group, members in raw.items():
            if not isinstance(members, dict):
                raise ValueError(f"{source}: group {group!r} must map category names to lists of terms")
            for name, terms in members.items():
                if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                    raise ValueError(f"{source}: category {name!r} must list its terms as strings")
                unique = list(dict.fromkeys([str(name), *terms]))
                categories.append(Category(str(name), str(group), tuple(unique)))
        return cls(categories, source)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Taxonomy:
        """The YAML at `path`, or the packaged taxonomy.yaml."""
        if path is None:
            text = resources.files("kaleido.data").joinpath("taxonomy.yaml").read_text(encoding="utf-8")
            source = "kaleido/data/taxonomy.yaml"
        else:
            text = Path(path).read_text(encoding="utf-8")
            source = str(path)
        return cls.from_mapping(yaml.safe_load(text), source)

    @property
    def num_terms(self) -> int:
        """Synonyms and instances, not counting the category names themselves."""
        return sum(len(category.terms) - 1 for category in self.categories.values())

    def groups(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {group: [] for group in SUBJECT_GROUPS}
        for category in self.categories.values():
            result[category.group].append(category.name)
        return result

    def group_of(self, category: str) -> str:
        return self.categories[category].group

    def match(self, caption: str) -> list[SubjectMatch]:
        """Every taxonomy term in `caption`, left to right, longest match first, no overlaps."""
        words = tokenize(caption)
        forms = [singular_forms(word) for word, _, _ in words]
        matches: list[SubjectMatch] = []
        position = 0
        while position < len(words):
            best = self._longest(forms, position)
            if best is None:
                position += 1
                continue
            end, category = best
            start_char, end_char = words[position][1], words[end - 1][2]
            matches.append(
                SubjectMatch(
                    term=caption[start_char:end_char],
                    category=category,
                    group=self.categories[category].group,
                    start=start_char,
                    end=end_char,
                )
            )
            position = end
        return matches

    def _longest(self, forms: list[list[str]], start: int) -> tuple[int, str] | None:
        """(end word index, category) of the best term starting at word `start`."""
        best: tuple[int, int, str] | None = None  # (words, exact words, category)
        stack: list[tuple[dict[str, Any], int, int]] = [(self._trie, start, 0)]
        while stack:
            node, index, exact = stack.pop()
            if "$" in node and index > start:
                candidate = (index - start, exact, node["$"])
                if best is None or candidate[:2] > best[:2]:
                    best = candidate
            if index < len(forms):
                for rank, form in enumerate(forms[index]):
                    child = node.get(form)
                    if child is not None:
                        stack.append((child, index + 1, exact + (rank == 0)))
        return None if best is None else (start + best[0], best[2])


@lru_cache(maxsize=4)
def load_taxonomy(path: str | None = None) -> Taxonomy:
    """Cached `Taxonomy.load` (one parse per process and path)."""
    return Taxonomy.load(path)


def match_subjects(caption: str, taxonomy: Taxonomy | None = None) -> list[SubjectMatch]:
    """Subject candidates in a caption (the packaged taxonomy unless one is given)."""
    return (taxonomy or load_taxonomy()).match(caption)


def candidate_categories(matches: Iterable[SubjectMatch]) -> list[tuple[str, str]]:
    """(category, group) of the matches, first occurrence order, without repeats."""
    return list(dict.fromkeys((match.category, match.group) for match in matches))
