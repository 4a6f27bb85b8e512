"""The caption grammar: canonical captions, the train/held-out split, paraphrases and the parser.

Canonical captions (every one names exactly one asset):

- ``a {colour} {shape}``                                   "a red cube"
- ``a {colour} {object}``                                  "a blue mug" (the whole object)
- ``a {colour} {object} with a {colour} {part}``           "a red mushroom with a white stem"
- ``a {colour} {shape} on top of a {colour} {shape}``      "a red cube on top of a blue cylinder"

("an" before a vowel). Paraphrases swap in synonyms ("crimson", "doughnut", "ball", "box") and wrap
the caption in templates ("a 3d model of ...", "..., 3d asset", "a small ..."); the parser undoes both.

Held-out split (fixed rules, no randomness): a colour x shape pair is held out when
``(colour + 3 * shape) % 8 == 0`` (indices into COLOUR_NAMES / SHAPES: 12 pairs, one per colour); a
stack is held out when either of its colour x shape pairs is; an object's whole colour when
``(colour + 5 * object) % 8 == 3``; an object's (colour, part colour) pair when
``(colour + 3 * part_colour + object) % 10 == 5``. Every colour, shape and object keeps many
training captions.
"""
import difflib
import functools
import random
import re
import zlib
from typing import Callable, Dict, List, Sequence, Tuple

from threestudio_mv.data.procedural.assets import (
    OBJECTS,
    SHAPES,
    STACK_BOTTOM_SHAPES,
    STACK_TOP_SHAPES,
    Asset,
    AssetKey,
    build_asset,
)
from threestudio_mv.data.procedural.colours import COLOUR_NAMES
from threestudio_mv.utils.errors import UserError

SPLITS = ("all", "train", "heldout")
# Colour offsets (in COLOUR_NAMES order) of the stacks' bottom colour relative to the top colour.
STACK_COLOUR_OFFSETS = (3, 4, 7)

COLOUR_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("tangerine", "bright orange"),
    "yellow": ("golden", "lemon"),
    "green": ("emerald", "leaf-green"),
    "blue": ("azure", "cobalt"),
    "purple": ("violet", "lilac"),
    "pink": ("rose", "bubblegum pink"),
    "white": ("ivory", "snow-white"),
    "black": ("jet-black", "ebony"),
    "brown": ("chocolate", "chestnut"),
    "gray": ("grey", "slate-grey"),
    "cyan": ("turquoise", "aqua"),
}
NOUN_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    # shapes
    "sphere": ("ball", "orb"),
    "cube": ("box", "block"),
    "cylinder": ("column", "pillar"),
    "cone": ("cone shape", "conical solid"),
    "torus": ("doughnut", "donut", "ring"),
    "capsule": ("pill", "pill shape"),
    "pyramid": ("square pyramid", "pyramid shape"),
    "ellipsoid": ("oval", "ovoid"),
    # objects
    "mushroom": ("toadstool",),
    "chair": ("dining chair", "kitchen chair"),
    "house": ("cottage", "hut"),
    "mug": ("cup", "coffee mug"),
    "snowman": ("snow man",),
    "table": ("dining table", "side table"),
    "lamp": ("desk lamp", "reading lamp"),
    "tree": ("pine tree", "fir tree"),
    "rocket": ("spaceship", "rocket ship"),
    "car": ("automobile", "toy car"),
    "duck": ("rubber duck", "duckling"),
    "robot": ("android", "toy robot"),
    "teapot": ("tea pot", "kettle"),
    # parts
    "stem": ("stalk",),
    "roof": ("rooftop",),
    "handle": ("grip",),
    "hat": ("top hat",),
    "shade": ("lampshade",),
    "fins": ("tail fins",),
    "beak": ("bill",),
    "lid": ("cover",),
}
TEMPLATES = (
    "{x}",
    "a 3d model of {x}",
    "{x}, 3d asset",
    "a small {y}",
    "a render of {x}",
    "a 3d rendering of {x}",
    "a photo of {x}",
    "{x} on a white background",
    "{x}, high quality 3d model",
)
STACK_RELATIONS = ("on top of", "stacked on", "sitting on top of", "resting on")

_WRAPPERS = [
    re.compile(r"^(?:a|an) (?:3d model|3d rendering|3d render|render|rendering|photo|picture|image) of "),
    re.compile(r",? (?:3d asset|high quality 3d model|3d model)$"),
    re.compile(r" on a white background$"),
]
_SIZE_ADJECTIVE = re.compile(r"^(?:a|an) (?:small|little|tiny) ")
_RELATION = re.compile(r" (?:stacked on|sitting on top of|sitting on|resting on|placed on) ")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _fix_articles(text: str) -> str:
    """Make every "a"/"an" agree with the word after it."""
    return re.sub(r"\b(a|an) (\w)", lambda m: f"{_article(m.group(2))} {m.group(2)}", text)


def _compose(key: AssetKey, word: Callable[[str], str] = lambda w: w, relation: str = "on top of") -> str:
    """The caption of ``key`` with every colour/noun passed through ``word`` (for synonyms)."""
    kind = key[0]
    if kind == "primitive":
        _, shape, colour = key
        text = f"a {word(colour)} {word(shape)}"
    elif kind == "object":
        _, name, colour, part_colour = key
        text = f"a {word(colour)} {word(name)}"
        if part_colour is not None:
            template = OBJECTS[name]
            part = f"{word(part_colour)} {word(template.part_noun)}"
            text += f" with {part}" if template.plural else f" with a {part}"
    elif kind == "stack":
        _, top_shape, top_colour, bottom_shape, bottom_colour = key
        text = f"a {word(top_colour)} {word(top_shape)} {relation} a {word(bottom_colour)} {word(bottom_shape)}"
    else:
        raise ValueError(f"unknown asset kind '{kind}'")
    return _fix_articles(text)


def _catalogue_entries() -> List[Tuple[AssetKey, bool]]:
    """Every asset key in vocabulary order, with whether it is held out."""
    colour_index = {c: i for i, c in enumerate(COLOUR_NAMES)}
    shape_index = {s: i for i, s in enumerate(SHAPES)}

    def pair_held_out(colour: str, shape: str) -> bool:
        return (colour_index[colour] + 3 * shape_index[shape]) % 8 == 0

    entries: List[Tuple[AssetKey, bool]] = []
    for shape in SHAPES:
        for colour in COLOUR_NAMES:
            entries.append((("primitive", shape, colour), pair_held_out(colour, shape)))
    for object_index, (name, template) in enumerate(OBJECTS.items()):
        for colour in COLOUR_NAMES:
            c = colour_index[colour]
            entries.append((("object", name, colour, None), (c + 5 * object_index) % 8 == 3))
            for part_colour in template.part_colours:
                if part_colour != colour:
                    held_out = (c + 3 * colour_index[part_colour] + object_index) % 10 == 5
                    entries.append((("object", name, colour, part_colour), held_out))
    for top_shape in STACK_TOP_SHAPES:
        for bottom_shape in STACK_BOTTOM_SHAPES:
            for top_colour in COLOUR_NAMES:
                for offset in STACK_COLOUR_OFFSETS:
                    bottom_colour = COLOUR_NAMES[(colour_index[top_colour] + offset) % len(COLOUR_NAMES)]
                    held_out = pair_held_out(top_colour, top_shape) or pair_held_out(bottom_colour, bottom_shape)
                    entries.append((("stack", top_shape, top_colour, bottom_shape, bottom_colour), held_out))
    return entries


@functools.lru_cache(maxsize=None)
def _catalogue() -> Tuple[Dict[str, Tuple[AssetKey, bool]], Dict[str, List[str]], Dict[str, str]]:
    """(caption -> (key, held out), split -> captions, normalised caption -> caption)."""
    by_caption: Dict[str, Tuple[AssetKey, bool]] = {}
    splits: Dict[str, List[str]] = {split: [] for split in SPLITS}
    lookup: Dict[str, str] = {}
    for key, held_out in _catalogue_entries():
        caption = _compose(key)
        assert caption not in by_caption, f"duplicate caption {caption!r}"
        by_caption[caption] = (key, held_out)
        splits["all"].append(caption)
        splits["heldout" if held_out else "train"].append(caption)
        lookup[normalise_caption(caption)] = caption
    return by_caption, splits, lookup


def vocabulary(split: str = "all") -> List[str]:
    """Canonical captions of ``split`` ("all", "train" or "heldout"), in a fixed order."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    return list(_catalogue()[1][split])


def is_held_out(caption: str) -> bool:
    """Whether the asset named by ``caption`` (any accepted wording) is in the held-out split."""
    return _catalogue()[0][parse_caption(caption).caption][1]


@functools.lru_cache(maxsize=1)
def _synonym_pattern() -> Tuple[re.Pattern, Dict[str, str]]:
    canonical = {}
    for table in (COLOUR_SYNONYMS, NOUN_SYNONYMS):
        for word, synonyms in table.items():
            for synonym in synonyms:
                canonical[synonym] = word
    alternatives = sorted(canonical, key=len, reverse=True)  # longest first: "top hat" before "hat"
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(a) for a in alternatives) + r")(?![\w-])")
    return pattern, canonical


def normalise_caption(text: str) -> str:
    """Map any accepted wording to a lookup key: lower case, no templates, canonical words, "a"."""
    text = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!").strip()
    for wrapper in _WRAPPERS:
        text = wrapper.sub("", text)
    text = _SIZE_ADJECTIVE.sub("a ", text)
    text = _RELATION.sub(" on top of ", text)
    pattern, canonical = _synonym_pattern()
    text = pattern.sub(lambda m: canonical[m.group(1)], text)
    return re.sub(r"\ban\b", "a", text)


def parse_caption(caption: str) -> Asset:
    """The asset a caption (canonical or a generated paraphrase) names; UserError if unknown."""
    if not isinstance(caption, str) or not caption.strip():
        raise UserError("empty caption; give one like 'a red cube' (list them with: python -m threestudio_mv.data.procedural vocab)")
    _, _, lookup = _catalogue()
    canonical = lookup.get(normalise_caption(caption))
    if canonical is None:
        suggestion = ", ".join(f"'{c}'" for c in closest_captions(caption))
        raise UserError(
            f"unknown caption '{caption}'; closest known: {suggestion} "
            "(list all with: python -m threestudio_mv.data.procedural vocab)"
        )
    return _asset(canonical)


@functools.lru_cache(maxsize=4096)
def _asset(canonical: str) -> Asset:
    key, _ = _catalogue()[0][canonical]
    return build_asset(key, canonical)


def paraphrases(caption: str, count: int = 8) -> List[str]:
    """Up to ``count`` distinct rewordings of a canonical caption (deterministic per caption)."""
    key, _ = _catalogue()[0][parse_caption(caption).caption]
    canonical = _compose(key)
    rng = random.Random(zlib.crc32(canonical.encode()))

    def word(w: str) -> str:
        synonyms = COLOUR_SYNONYMS.get(w, ()) + NOUN_SYNONYMS.get(w, ())
        return rng.choice(synonyms) if synonyms and rng.random() < 0.6 else w

    results: List[str] = []
    for _ in range(20 * count):
        if len(results) >= count:
            break
        text = _compose(key, word, rng.choice(STACK_RELATIONS))
        template = rng.choice(TEMPLATES)
        text = _fix_articles(template.format(x=text, y=text.split(" ", 1)[1]))
        if text != canonical and text not in results:
            results.append(text)
    return results


def closest_captions(text: str, n: int = 3, candidates: Sequence[str] = None) -> List[str]:
    """The ``n`` known captions most similar to ``text`` (difflib ratio)."""
    return difflib.get_close_matches(text.strip().lower(), list(candidates or vocabulary("all")), n=n, cutoff=0.0)
