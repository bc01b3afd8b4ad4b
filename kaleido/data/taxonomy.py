"""Subject taxonomy and caption matching (paper section 3.2 (2): subject candidates from captions).

The taxonomy (taxonomy.yaml in this package, or `data.caption.taxonomy`) maps synonyms and named
instances to a category and a group. `Taxonomy.match(caption)` scans the caption's words left to
right and, at each position, takes the LONGEST term that fits ("golden retriever" beats
"retriever", "teddy bear" beats "bear"; on equal length the word-for-word match beats one that
needed de-pluralising, so "glasses" is eyewear, not two drinking glasses). Words are compared in
lower case with accents removed ("Pokémon" = "pokemon", "café" = "cafe"); each caption word also
matches the singular forms it may be a plural of (regular rules plus an irregular table: people,
mice, geese, children, wolves, knives, cacti ...). Compound spellings match either way: a one-word
term written as two words or hyphenated ("fire-fighter", "fire fighters" = firefighter) and a
multi-word term written as one word ("teddybear" = teddy bear).

Compounds name ONE subject, their head (English puts the head last): a term directly followed by
another term ("nurse shark", "king penguin", "police horse", "baby elephant", "beach ball") or by a
word from NON_SUBJECT_HEADS ("cowboy costume", "cat-shaped cookie", "panda mask") only qualifies the
noun after it and adds no subject. "Directly" means separated by spaces or a hyphen only: a comma, a
possessive ("the fisherman's boat") or any other word in between keeps both.

Why hand rules: an offline part-of-speech tagger would decide noun compounds better, but spaCy's
English models are not on the package registry and NLTK's tagger downloads its data at run time;
for plural nouns the rules below cover what lemmatisers like lemminflect add.
"""

from __future__ import annotations

import re
import unicodedata
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
_JOINER = re.compile(r"[ \t-]+")  # what may separate the words of a compound: spaces or hyphens, nothing else

# Plural nouns of taxonomy terms that are far more often verbs in captions ("a boy fishes", "a man ducks under",
# "a skateboarder does a trick"): right after another subject they are read as its verb, never as the head of a
# compound, and "does" is never the plural of doe.
VERB_FORMS = frozenset({"does", "fishes", "ducks", "seals", "bears", "crows", "cranes", "swallows", "bats", "kids",
                        "rams", "flies", "seats", "plants", "trains", "boxes", "signs", "watches", "tops"})
NEVER_PLURAL = frozenset({"does"})

# Head nouns (not subjects themselves) that turn the term before them into a modifier: "a cowboy costume"
# shows no cowboy, "a dog-shaped balloon" no dog. Heads that ARE taxonomy terms need no entry (the later term
# wins anyway: "police car", "teddy bear").
NON_SUBJECT_HEADS = frozenset({
    "badge", "bed", "blanket", "bowl", "cage", "cake", "collar", "cookie", "cookies", "costume", "costumes",
    "cupcake", "cushion", "cutout", "decoration", "decorations", "department", "drawing", "drawings", "emblem",
    "emoji", "fabric", "figurine", "food", "footprint", "footprints", "graphic", "graphics", "hoodie", "house",
    "hut", "icon", "icons", "illustration", "image", "images", "kennel", "keychain", "leash", "logo", "logos",
    "magnet", "mask", "masks", "motif", "ornament", "ornaments", "outfit", "painting", "paintings", "pajamas",
    "pattern", "patterns", "paw", "pawprint", "pawprints", "photo", "photograph", "photographs", "photos", "picture",
    "pictures", "pillow", "portrait", "poster", "posters", "print", "prints", "rug", "shadow", "shaped", "shirt",
    "silhouette", "sketch", "slippers", "socks", "station", "sticker", "stickers", "styled", "sweater", "tattoo",
    "tattoos", "themed", "towel", "trap", "treat", "treats", "tshirt", "uniform", "wallpaper",
})


def fold(word: str) -> str:
    """Lower case without accents: "Pokémon" -> "pokemon", "Café" -> "cafe" (NFKD, combining marks dropped)."""
    decomposed = unicodedata.normalize("NFKD", word.lower())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """(folded word, start, end) for each word of `text` (offsets into `text` as given)."""
    return [(fold(m.group(0)), m.start(), m.end()) for m in _WORD.finditer(text)]


def singular_forms(word: str) -> list[str]:
    """`word` itself first, then the singulars it may be the plural of (over-generating is harmless:
    a form only counts if it is a taxonomy term)."""
    forms = [word]
    if word in NEVER_PLURAL:
        return forms

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
        self._joined: dict[str, str] = {}  # "teddybear" -> toy
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
        # a multi-word term written as one word ("teddybear") when that spelling names nothing else
        for words, name in owners.items():
            joined = ("".join(words),)
            if len(words) > 1 and joined not in owners:
                self._joined.setdefault(joined[0], name)

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
        """Every subject named in `caption`, left to right: longest term first, no overlaps, and the qualifier
        of a compound dropped (see the module docstring)."""
        words = tokenize(caption)
        forms = [singular_forms(word) for word, _, _ in words]
        found: list[tuple[int, int, str]] = []  # (first word, end word, category)
        position = 0
        while position < len(words):
            best = self._longest(caption, words, forms, position)
            follows = bool(found) and found[-1][1] == position and self._joined_words(caption, words, position - 1,
                                                                                      position)
            if best is not None and follows and best[0] == position + 1 and words[position][0] in VERB_FORMS:
                best = None  # "a boy fishes": the verb of the subject before it, not a subject
            if best is None:
                position += 1
                continue
            end, category = best
            found.append((position, end, category))
            position = end
        kept = []
        for index, (start, end, category) in enumerate(found):
            following = found[index + 1] if index + 1 < len(found) else None
            if following is not None and following[0] == end and self._joined_words(caption, words, end - 1, end):
                continue  # "nurse shark": the next term is the head, this one only qualifies it
            if end < len(words) and words[end][0] in NON_SUBJECT_HEADS and self._joined_words(
                caption, words, end - 1, end
            ):
                continue  # "cowboy costume": a head noun that is no subject
            kept.append((start, end, category))
        matches = []
        for start, end, category in kept:
            start_char, end_char = words[start][1], words[end - 1][2]
            matches.append(
                SubjectMatch(
                    term=caption[start_char:end_char],
                    category=category,
                    group=self.categories[category].group,
                    start=start_char,
                    end=end_char,
                )
            )
        return matches

    @staticmethod
    def _joined_words(caption: str, words: list[tuple[str, int, int]], left: int, right: int) -> bool:
        """True when words[left] and words[right] are separated by spaces or hyphens only (one compound)."""
        gap = caption[words[left][2] : words[right][1]]
        return bool(_JOINER.fullmatch(gap))

    def _split_spelling(
        self, caption: str, words: list[tuple[str, int, int]], start: int
    ) -> tuple[int, str] | None:
        """A one-word term written as 2 or 3 words ("fire-fighters", "sun glasses"): (end word, category)."""
        best = None
        for end in range(start + 2, min(start + 3, len(words)) + 1):
            if not self._joined_words(caption, words, end - 2, end - 1):
                break
            joined = "".join(word for word, _, _ in words[start:end])
            for form in singular_forms(joined):
                category = self._trie.get(form, {}).get("$") or self._joined.get(form)
                if category is not None:
                    best = (end, category)
                    break
        return best

    def _longest(
        self, caption: str, words: list[tuple[str, int, int]], forms: list[list[str]], start: int
    ) -> tuple[int, str] | None:
        """(end word index, category) of the best term starting at word `start`."""
        best: tuple[int, int, str] | None = None  # (words, exact words, category)
        stack: list[tuple[dict[str, Any], int, int]] = [(self._trie, start, 0)]
        while stack:
            node, index, exact = stack.pop()
            if "$" in node and index > start:
                candidate = (index - start, exact, node["$"])
                if best is None or candidate[:2] > best[:2]:
                    best = candidate
            if index < len(forms) and (index == start or self._joined_words(caption, words, index - 1, index)):
                for rank, form in enumerate(forms[index]):
                    child = node.get(form)
                    if child is not None:
                        stack.append((child, index + 1, exact + (rank == 0)))
        for form in forms[start]:  # "teddybear": a multi-word term written as one word
            if form in self._joined and (best is None or best[0] <= 1):
                best = (1, int(form == forms[start][0]), self._joined[form])
                break
        split = self._split_spelling(caption, words, start)
        if split is not None and (best is None or split[0] - start > best[0]):
            return split
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
