"""Caption grammar: vocabulary, held-out split, round trips, paraphrases and the unknown-caption error."""
import pytest

from threestudio_mv.data.procedural import COLOUR_NAMES, OBJECTS, SHAPES, is_held_out, parse_caption, vocabulary
from threestudio_mv.data.procedural.captions import normalise_caption
from threestudio_mv.utils.errors import UserError


def test_vocabulary_size_and_split() -> None:
    every, train, held_out = vocabulary("all"), vocabulary("train"), vocabulary("heldout")
    assert 300 <= len(every) <= 2000
    assert len(set(every)) == len(every)
    assert set(train) | set(held_out) == set(every) and not set(train) & set(held_out)
    assert 0.10 <= len(held_out) / len(every) <= 0.15
    assert len(held_out) >= 40
    kinds = {parse_caption(caption).kind for caption in held_out}
    assert kinds == {"primitive", "object", "stack"}
    assert vocabulary("heldout") == held_out  # fixed, not random


def test_every_colour_shape_and_object_is_trained() -> None:
    train = [parse_caption(caption) for caption in vocabulary("train")]
    primitives = [asset.key for asset in train if asset.kind == "primitive"]
    assert {shape for _, shape, _ in primitives} == set(SHAPES)
    assert {colour for _, _, colour in primitives} == set(COLOUR_NAMES)
    objects = [asset.key for asset in train if asset.kind == "object"]
    assert {name for _, name, _, _ in objects} == set(OBJECTS)
    assert {colour for _, _, colour, _ in objects} == set(COLOUR_NAMES)


def test_held_out_colour_shape_pairs_never_appear_in_training() -> None:
    held_pairs = {(a.key[2], a.key[1]) for a in map(parse_caption, vocabulary("heldout")) if a.kind == "primitive"}
    assert len(held_pairs) == 12
    for caption in vocabulary("train"):
        asset = parse_caption(caption)
        if asset.kind == "stack":
            _, top_shape, top_colour, bottom_shape, bottom_colour = asset.key
            assert (top_colour, top_shape) not in held_pairs and (bottom_colour, bottom_shape) not in held_pairs


def test_canonical_examples() -> None:
    for caption in ["a red cube", "a blue mug", "a red mushroom with a white stem", "a red cube on top of a blue cylinder"]:
        assert parse_caption(caption).caption == caption
    mushroom = parse_caption("a red mushroom with a white stem")
    assert mushroom.colour_names == {"stem": "white", "cap": "red"}
    assert parse_caption("an orange cube").key == ("primitive", "cube", "orange")
    assert parse_caption("a white snowman with a black hat").colour_names["nose"] == "orange"


def test_every_caption_round_trips_and_every_paraphrase_parses_back() -> None:
    for caption in vocabulary("all"):
        asset = parse_caption(caption)
        assert asset.caption == caption
        paraphrases = asset.paraphrases()
        assert len(paraphrases) == 8 and caption not in paraphrases
        for paraphrase in paraphrases:
            assert parse_caption(paraphrase) is asset, (paraphrase, caption)


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("a crimson doughnut", "a red torus"),
        ("A 3D model of a blue ball.", "a blue sphere"),
        ("a small scarlet box", "a red cube"),
        ("a blue mug, 3d asset", "a blue mug"),
        ("an ivory cup with a jet-black grip", "a white mug with a black handle"),
        ("a tangerine block resting on an azure pillar", "an orange cube on top of a blue cylinder"),
        ("a grey   robot with a turquoise head on a white background", "a gray robot with a cyan head"),
    ],
)
def test_paraphrases_parse(text: str, canonical: str) -> None:
    assert parse_caption(text).caption == canonical


def test_paraphrases_are_deterministic_and_varied() -> None:
    asset = parse_caption("a red torus")
    assert asset.paraphrases() == parse_caption("a crimson doughnut").paraphrases()
    words = " ".join(asset.paraphrases())
    assert any(word in words for word in ("crimson", "scarlet")) and any(w in words for w in ("doughnut", "donut", "ring"))


def test_unknown_caption_names_the_closest_known() -> None:
    with pytest.raises(UserError) as error:
        parse_caption("a red cub")
    message = str(error.value)
    assert "'a red cube'" in message and "\n" not in message
    with pytest.raises(UserError, match="empty caption"):
        parse_caption("  ")
    with pytest.raises(UserError, match="unknown split"):
        vocabulary("test")


def test_normalise_does_not_confuse_synonyms_inside_longer_words() -> None:
    assert normalise_caption("a snow-white snow man with a top hat") == "a white snowman with a hat"
    assert normalise_caption("a red desk lamp with a white lampshade") == "a red lamp with a white shade"


def test_is_held_out() -> None:
    held = vocabulary("heldout")[0]
    assert is_held_out(held) and not is_held_out(vocabulary("train")[0])
