"""``scripts/score_demo_slots.py``: the slot scores of docs/benchmarks.md on known answers."""

import pytest


@pytest.fixture(scope="module")
def score(load_script):
    return load_script("score_demo_slots")


def test_the_issue_s_wrong_example_is_wrong_in_every_slot(score):
    got = score.slot_scores("Priya will lend Zoe the airport on Thursday.",
                            "Clara will meet Jonas at the school on Friday at 11 am.")
    assert got == {"people": False, "place": False, "day": False}


def test_a_right_summary_in_other_words_is_right_in_every_slot(score):
    got = score.slot_scores("Jonas and Clara meet on Friday, school, 11 am.",
                            "Clara will meet Jonas at the school on Friday at 11 am.")
    assert got == {"people": True, "place": True, "day": True}


def test_people_must_match_exactly_and_places_whole(score):
    reference = "Tom and Lena will have dinner at the sushi bar on Monday."
    assert score.slot_scores("Tom will have dinner at the bar on Monday.", reference) == {
        "people": False, "place": False, "day": True}  # Lena missing; "bar" is not "sushi bar"
    assert score.slot_scores("Tom, Lena and Ben: sushi bar, Monday.", reference)["people"] is False  # one too many
    # No place or day in the reference: right by default.
    assert score.slot_scores("Tom will call Lena.", "Tom will call Lena.") == {
        "people": True, "place": True, "day": True}
