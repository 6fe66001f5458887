"""A seeded generator of SAMSum-style chat dialogues and their one-line summaries.

Each example picks an *intent* (meet, pick up, lend, run late, cancel, invite, dinner,
remind, buy, movie), two or three speakers, and slots (place, time, day, item, ...).
The dialogue states the plan in one of several phrasings, interleaved with optional
small talk that does not change the plan; the summary is a fixed template of the
intent filled with the slots, e.g.::

    Amanda: hey, are you free tomorrow?
    Tom: yes, what's up?
    Amanda: let's meet at the cafe at 5 pm
    Tom: sounds good, see you there
    ->  Amanda will meet Tom at the cafe on Friday at 5 pm.

So the summary is a deterministic function of the dialogue (intent -> template, slots
copied from the text) that a tiny encoder-decoder can learn within minutes on a CPU,
while the surface text varies enough (names, phrasings, filler turns, optional extra
fact) that it has to read the dialogue rather than memorise targets. Every word list
and template here was written for this project; nothing is taken from a dataset.

The ``intent`` column is the grouping key for content-skew partitioning.
"""

from __future__ import annotations

import numpy as np

from fedjax_fm.data.records import TextExamples

NAMES = (
    "Amanda", "Tom", "Lena", "Marco", "Priya", "Jonas", "Sofia", "Ethan", "Mila", "Omar",
    "Hannah", "Lucas", "Chloe", "Daniel", "Nora", "Felix", "Aisha", "Leo", "Grace", "Ivan",
    "Julia", "Ben", "Zoe", "Mateo", "Clara", "Sam", "Elena", "Noah", "Yuki", "Oscar",
    "Maya", "Adam", "Ruby", "Kofi", "Ines", "Pavel", "Lucy", "Hugo", "Sara", "Tariq",
)
PLACES = (
    "cafe", "library", "station", "gym", "park", "office", "mall", "cinema", "bakery",
    "museum", "airport", "school", "market", "beach", "bar", "hotel", "bookshop", "stadium",
)
RESTAURANTS = ("pizzeria", "sushi bar", "steakhouse", "noodle place", "taco stand", "bistro", "curry house")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMES = tuple(f"{h} {m}" for m in ("am", "pm") for h in range(1, 13) if (m, h) not in {("am", 1), ("am", 2), ("am", 3), ("am", 4), ("am", 5)})
ITEMS = (
    "charger", "umbrella", "bike", "camera", "drill", "tent", "laptop", "guitar", "ladder",
    "car", "blender", "projector", "suitcase", "headphones", "keys", "notes", "jacket",
)
GROCERIES = ("milk", "bread", "eggs", "coffee", "apples", "rice", "cheese", "tomatoes", "pasta", "butter", "juice")
TASKS = (
    "pay the rent", "call the plumber", "send the report", "book the flights", "water the plants",
    "renew the passport", "feed the cat", "return the books", "fix the printer", "submit the form",
)
GENRES = ("horror", "comedy", "action", "sci-fi", "romantic", "animated", "crime", "fantasy")
MINUTES = ("5", "10", "15", "20", "30", "45")
EVENTS = ("the meeting", "the class", "the rehearsal", "the match", "the interview", "the appointment", "the training")
BRING = ("the tickets", "some snacks", "the cake", "a blanket", "the map", "some drinks", "the chargers", "the board game")

SMALL_TALK = (
    ("how was your weekend?", "pretty good, I went hiking with my cousins"),
    ("did you see the game last night?", "yes, what a finish, I couldn't believe it"),
    ("how is the new job going?", "busy but fun, my team is really nice"),
    ("it's so cold today", "I know, I almost stayed in bed all morning"),
    ("have you finished that book yet?", "almost, only two chapters left"),
    ("my phone keeps dying", "you should really get a new battery"),
    ("are you still learning Spanish?", "a little every day, it's getting easier"),
    ("I just got back from the dentist", "oh no, hope it didn't hurt too much"),
    ("the neighbours are painting their house again", "haha, what colour this time?"),
    ("I made soup for the whole week", "smart, I should do that too"),
    ("traffic was terrible this morning", "same here, I was stuck for ages"),
    ("did you get my photos?", "yes, they look amazing"),
    ("what are you cooking tonight?", "probably just pasta, nothing fancy"),
    ("my sister is visiting next month", "nice, tell her I said hi"),
    ("I can't find my glasses anywhere", "did you check the car?"),
    ("the new cafe downtown is really good", "I have to try it then"),
    ("I'm so tired after this week", "me too, I need a long sleep"),
    ("have you watched the new series?", "only the first episode so far"),
)
# Single utterances that fill an odd slot of a long dialogue without changing the plan.
FILLERS = ("haha", "lol", "one sec", "wait", "ok", "true", "right?", "hmm", ":D", "brb")
# SAMSum's dialogues spread about evenly over these utterance counts (3-30).
SAMSUM_UTTERANCE_BUCKETS = ((3, 6), (7, 12), (13, 18), (19, 30))
OPENERS = ("hey", "hi", "hello", "hey there", "morning", "hi again", "yo")
REPLIES = ("hi!", "hey, what's up?", "hello :)", "hi, all good?", "hey! tell me")
AGREE = ("sounds good", "ok, deal", "great, see you then", "perfect", "sure thing", "works for me", "cool, thanks")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _meet(rng, a, b):
    place, day, time = _pick(rng, PLACES), _pick(rng, DAYS), _pick(rng, TIMES)
    ask = _pick(rng, (
        f"are you free on {day}? let's meet at the {place} at {time}",
        f"want to meet on {day} at {time}? maybe at the {place}",
        f"can we meet at the {place} on {day}, around {time}?",
    ))
    return [(a, ask), (b, _pick(rng, AGREE))], f"{a} will meet {b} at the {place} on {day} at {time}."


def _pickup(rng, a, b):
    place, time = _pick(rng, PLACES), _pick(rng, TIMES)
    ask = _pick(rng, (
        f"could you pick me up from the {place}? I'm done at {time}",
        f"can you get me at the {place} at {time}? my car is broken",
        f"any chance you could collect me from the {place} at {time}?",
    ))
    return [(b, ask), (a, _pick(rng, ("sure, I'll be there", "no problem", "ok, wait at the entrance")))], (
        f"{a} will pick {b} up from the {place} at {time}."
    )


def _lend(rng, a, b):
    item, day = _pick(rng, ITEMS), _pick(rng, DAYS)
    ask = _pick(rng, (
        f"can I borrow your {item} on {day}?",
        f"do you still have that {item}? I need it on {day}",
        f"would you lend me your {item} for {day}?",
    ))
    return [(b, ask), (a, _pick(rng, ("of course, take it", "sure, come get it", "yes, no problem")))], (
        f"{a} will lend {b} the {item} on {day}."
    )


def _late(rng, a, b):
    minutes, event = _pick(rng, MINUTES), _pick(rng, EVENTS)
    say = _pick(rng, (
        f"sorry, I'm running {minutes} minutes late for {event}",
        f"I'll be {minutes} minutes late to {event}, the bus is slow",
        f"start {event} without me, I'm {minutes} minutes behind",
    ))
    return [(a, say), (b, _pick(rng, ("ok, no worries", "fine, we'll wait", "thanks for letting me know")))], (
        f"{a} will be {minutes} minutes late for {event}."
    )


def _cancel(rng, a, b):
    event, day = _pick(rng, EVENTS), _pick(rng, DAYS)
    say = _pick(rng, (
        f"I can't make it to {event} on {day}, I'm sick",
        f"I have to cancel {event} on {day}, something came up",
        f"{day} is not going to work for {event}, sorry",
    ))
    return [(a, say), (b, _pick(rng, ("that's a pity", "ok, get well soon", "no problem, another time")))], (
        f"{a} can't come to {event} on {day}."
    )


def _invite(rng, a, b):
    day, place = _pick(rng, DAYS), _pick(rng, PLACES)
    say = _pick(rng, (
        f"I'm having a birthday party at the {place} on {day}, will you come?",
        f"come to my birthday party on {day}! it's at the {place}",
        f"my birthday party is on {day} at the {place}, you're invited",
    ))
    return [(a, say), (b, _pick(rng, ("yes, I'd love to!", "of course I'll come", "count me in")))], (
        f"{b} will come to {a}'s birthday party at the {place} on {day}."
    )


def _dinner(rng, a, b):
    restaurant, time, people = _pick(rng, RESTAURANTS), _pick(rng, TIMES), _pick(rng, ("two", "three", "four", "five", "six"))
    say = _pick(rng, (
        f"I booked a table for {people} at the {restaurant} at {time}",
        f"reservation done: the {restaurant}, {time}, table for {people}",
        f"got us a table for {people} at the {restaurant}, {time}",
    ))
    return [(a, say), (b, _pick(rng, AGREE))], f"{a} booked a table for {people} at the {restaurant} at {time}."


def _remind(rng, a, b):
    task, day = _pick(rng, TASKS), _pick(rng, DAYS)
    say = _pick(rng, (
        f"don't forget to {task} by {day}",
        f"remember you have to {task} before {day}",
        f"reminder: {task}, the deadline is {day}",
    ))
    return [(b, say), (a, _pick(rng, ("thanks, I almost forgot", "yes, I'm on it", "right, will do")))], (
        f"{a} has to {task} by {day}."
    )


def _buy(rng, a, b):
    first, second = rng.choice(len(GROCERIES), size=2, replace=False)
    first, second = GROCERIES[int(first)], GROCERIES[int(second)]
    say = _pick(rng, (
        f"can you buy {first} and {second} on your way home?",
        f"we're out of {first} and {second}, could you get some?",
        f"please pick up {first} and {second} from the shop",
    ))
    return [(b, say), (a, _pick(rng, ("sure, anything else?", "ok, will do", "yes, on my way")))], (
        f"{a} will buy {first} and {second}."
    )


def _movie(rng, a, b):
    genre, day = _pick(rng, GENRES), _pick(rng, DAYS)
    say = _pick(rng, (
        f"want to see the new {genre} film on {day}?",
        f"there's a {genre} movie on {day}, shall we go?",
        f"cinema on {day}? I want to watch that {genre} film",
    ))
    return [(a, say), (b, _pick(rng, ("yes, let's go", "I'm in", "good idea")))], (
        f"{a} and {b} will watch a {genre} film on {day}."
    )


INTENTS = {
    "meet": _meet, "pickup": _pickup, "lend": _lend, "late": _late, "cancel": _cancel,
    "invite": _invite, "dinner": _dinner, "remind": _remind, "buy": _buy, "movie": _movie,
}


def _samsum_dialogue(rng: np.random.Generator, extra_fact_prob: float) -> tuple[str, str, str]:
    """A dialogue of ``n`` utterances, ``n`` drawn like SAMSum's: a bucket of
    :data:`SAMSUM_UTTERANCE_BUCKETS` uniformly, then ``n`` uniformly within it.

    The plan (2 utterances) and a closing line are always there; an opening exchange
    from 5 utterances, the optional extra fact (2) from 7; small-talk pairs (and one
    filler for an odd count) make up the rest.
    """
    lo, hi = SAMSUM_UTTERANCE_BUCKETS[int(rng.integers(len(SAMSUM_UTTERANCE_BUCKETS)))]
    n = int(rng.integers(lo, hi + 1))
    intent = _pick(rng, tuple(INTENTS))
    a, b, c = (NAMES[int(i)] for i in rng.choice(len(NAMES), size=3, replace=False))
    plan, summary = INTENTS[intent](rng, a, b)
    opening = [(a, _pick(rng, OPENERS)), (b, _pick(rng, REPLIES))] if n >= 5 else []
    extra = []
    if n >= 7 and rng.random() < extra_fact_prob:
        thing = _pick(rng, BRING)
        extra = [(a, f"can you bring {thing}?"), (b, _pick(rng, (f"sure, I'll bring {thing}", f"yes, I'll take {thing}")))]
        summary += f" {b} will bring {thing}."
    rest = n - len(plan) - 1 - len(opening) - len(extra)
    talkers = (a, b, c) if rng.random() < 0.3 else (a, b)
    small = []
    pairs = rest // 2
    for k in rng.choice(len(SMALL_TALK), size=pairs, replace=pairs > len(SMALL_TALK)):
        first = _pick(rng, talkers)
        second = _pick(rng, tuple(t for t in talkers if t != first))
        small += [(first, SMALL_TALK[int(k)][0]), (second, SMALL_TALK[int(k)][1])]
    if rest % 2:
        small.insert(2 * int(rng.integers(pairs + 1)), (_pick(rng, talkers), _pick(rng, FILLERS)))  # between pairs
    turns = opening + small + plan + extra
    turns.append((_pick(rng, (a, b)), _pick(rng, ("bye!", "see you", ":)", "ok", "thanks!"))))
    dialogue = "\n".join(f"{speaker}: {text}" for speaker, text in turns)
    return dialogue, summary, intent


def synthetic_dialogue(rng: np.random.Generator, *, small_talk_turns: tuple[int, int] = (0, 2),
                       extra_fact_prob: float = 0.3, lengths: str = "samsum") -> tuple[str, str, str]:
    """One (dialogue, summary, intent) triple drawn from ``rng``.

    ``lengths="samsum"``: the number of utterances follows SAMSum's spread (3-30, about
    evenly over 3-6, 7-12, 13-18 and 19-30; :func:`_samsum_dialogue`), and
    ``small_talk_turns`` is ignored. ``lengths="small_talk"``: ``small_talk_turns =
    (lo, hi)`` draws between ``lo`` and ``hi`` (inclusive) exchanges of small talk that
    do not change the summary. Either way ``extra_fact_prob`` is the chance that one
    speaker also agrees to bring something, which adds a second summary sentence.
    """
    if lengths == "samsum":
        return _samsum_dialogue(rng, extra_fact_prob)
    if lengths != "small_talk":
        raise ValueError(f"lengths must be 'samsum' or 'small_talk', got {lengths!r}")
    intent = _pick(rng, tuple(INTENTS))
    a, b, c = (NAMES[int(i)] for i in rng.choice(len(NAMES), size=3, replace=False))
    plan, summary = INTENTS[intent](rng, a, b)
    turns = [(a, _pick(rng, OPENERS)), (b, _pick(rng, REPLIES))]
    n_small = int(rng.integers(small_talk_turns[0], small_talk_turns[1] + 1))
    talkers = (a, b, c) if rng.random() < 0.3 else (a, b)
    for k in rng.choice(len(SMALL_TALK), size=min(n_small, len(SMALL_TALK)), replace=False):
        first = _pick(rng, talkers)
        second = _pick(rng, tuple(t for t in talkers if t != first))
        turns += [(first, SMALL_TALK[int(k)][0]), (second, SMALL_TALK[int(k)][1])]
    turns += plan
    if rng.random() < extra_fact_prob:
        thing = _pick(rng, BRING)
        turns += [(a, f"can you bring {thing}?"), (b, _pick(rng, (f"sure, I'll bring {thing}", f"yes, I'll take {thing}")))]
        summary += f" {b} will bring {thing}."
    turns.append((_pick(rng, (a, b)), _pick(rng, ("bye!", "see you", ":)", "ok", "thanks!"))))
    dialogue = "\n".join(f"{speaker}: {text}" for speaker, text in turns)
    return dialogue, summary, intent


def synthetic_examples(num_examples: int, *, seed: int = 0, small_talk_turns: tuple[int, int] = (0, 2),
                       extra_fact_prob: float = 0.3, id_prefix: str = "syn", lengths: str = "samsum") -> TextExamples:
    """``num_examples`` synthetic dialogues, reproducible from ``seed``.

    Example ``i`` is drawn from ``default_rng([seed, i])``, so a larger set extends a
    smaller one with the same seed and train/eval sets built with different seeds differ.
    The ``intent`` column holds each example's intent (the content-skew grouping key).
    """
    dialogues, summaries, intents = [], [], []
    for i in range(num_examples):
        dialogue, summary, intent = synthetic_dialogue(
            np.random.default_rng([seed, i]), small_talk_turns=small_talk_turns, extra_fact_prob=extra_fact_prob,
            lengths=lengths,
        )
        dialogues.append(dialogue)
        summaries.append(summary)
        intents.append(intent)
    ids = [f"{id_prefix}-{seed}-{i}" for i in range(num_examples)]
    return TextExamples(dialogues, summaries, ids, {"intent": intents}, origin=f"synthetic(seed={seed})")
