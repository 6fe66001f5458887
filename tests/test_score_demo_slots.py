"""``scripts/score_demo_slots.py``: the slot scores of docs/benchmarks.md on known answers."""

import pytest


@pytest.fixture(scope="module")
def score(load_script):
    return load_script("score_demo_slots")


def test_the_issue_s_wrong_example_is_wrong_in_every_slot(score):
    got = score.slot_scores("Priya will lend Zoe the airport on Thursday.",
                            "Clara will meet Jonas at the school on Friday at 11 am.")
    assert got == {"people": False, "people in order": False, "place": False, "day": False}


def test_a_right_summary_in_other_words_is_right_in_every_slot(score):
    got = score.slot_scores("Jonas and Clara meet on Friday, school, 11 am.",
                            "Clara will meet Jonas at the school on Friday at 11 am.")
    assert got == {"people": True, "people in order": False, "place": True, "day": True}  # Jonas first


def test_people_must_match_exactly_and_places_whole(score):
    reference = "Tom and Lena will have dinner at the sushi bar on Monday."
    assert score.slot_scores("Tom will have dinner at the bar on Monday.", reference) == {
        "people": False, "people in order": False, "place": False, "day": True}  # Lena missing; "bar" is not "sushi bar"
    assert score.slot_scores("Tom, Lena and Ben: sushi bar, Monday.", reference)["people"] is False  # one too many
    # No place or day in the reference: right by default.
    assert score.slot_scores("Tom will call Lena.", "Tom will call Lena.") == {
        "people": True, "people in order": True, "place": True, "day": True}


def test_people_in_order_catches_a_right_cast_in_the_wrong_roles(score):
    # the demo's commonest remaining mistake: both people named, the second sentence's wrong
    got = score.slot_scores("Maya will pick Sara up from the bar at 11 am. Maya will bring some snacks.",
                            "Maya will pick Sara up from the bar at 11 am. Sara will bring some snacks.")
    assert got["people"] and not got["people in order"] and got["place"]
    assert score.names_in_order("Lucas and Lucas will go", ["Lucas", "Sara"]) == ["Lucas", "Lucas"]
