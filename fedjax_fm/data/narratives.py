"""A seeded generator of short everyday texts: the corpus the demo's base model is pretrained on.

Each text is a few sentences of one of several kinds (a diary entry, a message
thread, a note on a fridge, a short story, a weekly timetable, a chat, a short chat
followed by a line someone wrote about its plan), in which a small cast of people,
places, days and times is introduced and then *mentioned again*::

    On Thursday Hugo took the bus to the museum. He met Kofi there at 3 pm.
    Kofi had brought a camera, and Hugo borrowed it for the afternoon.
    At the museum they saw a film about the sea. Hugo was home by 7 pm.

So a model pretrained on it (with span corruption, ``fedjax_fm.data.span_corruption``)
learns ordinary English about plans and errands and, because a masked name, place
or day can usually be recovered from elsewhere in the same text, to copy entities
from its context. It holds none of the demo's dialogue -> summary pairs: the
``chat_note`` kind retells a chat's plan in one line, but with its own chat phrasings
(``PLAN_LINES``) and its own wordings of the plan (``RECAPS``), never the demo's
(``fedjax_fm.data.synthetic``), whose templates are learned only in fine-tuning. Its word
lists are its own (a superset of the demo's entities, so that the tokenizer trained
on it spells them), written for this project and released with it under Apache-2.0.
"""

from __future__ import annotations

import numpy as np

NAMES = (
    "Amanda", "Tom", "Lena", "Marco", "Priya", "Jonas", "Sofia", "Ethan", "Mila", "Omar",
    "Hannah", "Lucas", "Chloe", "Daniel", "Nora", "Felix", "Aisha", "Leo", "Grace", "Ivan",
    "Julia", "Ben", "Zoe", "Mateo", "Clara", "Sam", "Elena", "Noah", "Yuki", "Oscar",
    "Maya", "Adam", "Ruby", "Kofi", "Ines", "Pavel", "Lucy", "Hugo", "Sara", "Tariq",
    "Anna", "Max", "Emma", "Karim", "Lisa", "Paul", "Rosa", "Victor", "Alice", "Jamal",
    "Eva", "Finn", "Irene", "Diego", "Mia", "Rahul", "Nina", "Peter", "Layla", "Samuel",
)
PLACES = (
    "cafe", "library", "station", "gym", "park", "office", "mall", "cinema", "bakery",
    "museum", "airport", "school", "market", "beach", "bar", "hotel", "bookshop", "stadium",
    "pizzeria", "sushi bar", "steakhouse", "noodle place", "taco stand", "bistro", "curry house",
    "pharmacy", "post office", "harbour", "garden", "theatre", "bank", "hospital", "zoo",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMES = tuple(f"{h} {m}" for m in ("am", "pm") for h in range(1, 13))
ITEMS = (
    "charger", "umbrella", "bike", "camera", "drill", "tent", "laptop", "guitar", "ladder",
    "car", "blender", "projector", "suitcase", "headphones", "keys", "notes", "jacket",
    "milk", "bread", "eggs", "coffee", "apples", "rice", "cheese", "tomatoes", "pasta", "butter", "juice",
    "tickets", "snacks", "cake", "blanket", "map", "drinks", "board game", "flowers", "book", "scarf",
)
EVENTS = ("the meeting", "the class", "the rehearsal", "the match", "the interview", "the appointment",
          "the training", "the concert", "the party", "the lecture", "the film", "the dinner")
TASKS = (
    "pay the rent", "call the plumber", "send the report", "book the flights", "water the plants",
    "renew the passport", "feed the cat", "return the books", "fix the printer", "submit the form",
    "clean the windows", "walk the dog", "buy a present", "wash the car", "print the tickets",
)
GENRES = ("horror", "comedy", "action", "sci-fi", "romantic", "animated", "crime", "fantasy", "war", "musical")
WEATHER = ("it was raining", "the sun was out", "it was very windy", "it was cold", "it was warm and quiet")
FEELINGS = ("happy", "tired", "late", "hungry", "nervous", "excited", "calm", "busy")
NUMBERS = ("two", "three", "four", "five", "six", "5", "10", "15", "20", "30", "45")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cast(rng: np.random.Generator, n: int) -> list[str]:
    return [NAMES[int(i)] for i in rng.choice(len(NAMES), size=n, replace=False)]


def _diary(rng):
    a, b = _cast(rng, 2)
    place, day, time, item = _pick(rng, PLACES), _pick(rng, DAYS), _pick(rng, TIMES), _pick(rng, ITEMS)
    later = _pick(rng, TIMES)
    return " ".join([
        f"On {day} {a} went to the {place}.",
        _pick(rng, (f"{a} met {b} there at {time}.", f"At {time} {b} arrived at the {place} too.",
                    f"{b} was already waiting at the {place} at {time}.")),
        _pick(rng, (f"{b} had brought the {item}, and {a} borrowed it.", f"{a} gave {b} the {item}.",
                    f"They talked about the {item} for a while.")),
        f"Outside {_pick(rng, WEATHER)}.",
        _pick(rng, (f"{a} was home from the {place} by {later}.", f"{b} left the {place} at {later}.",
                    f"On {day} evening {a} felt {_pick(rng, FEELINGS)}.")),
    ])


def _thread(rng):
    a, b = _cast(rng, 2)
    place, day, time = _pick(rng, PLACES), _pick(rng, DAYS), _pick(rng, TIMES)
    lines = [
        f"{a}: {_pick(rng, ('hi', 'hey', 'hello'))} {b}",
        f"{b}: {_pick(rng, ('hi!', 'hey, what is up?', 'hello :)', 'hi, all good?', 'yo'))}",
        f"{a}: " + _pick(rng, (f"I am at the {place} now", f"are you going to the {place} on {day}?",
                               f"the {place} opens at {time} on {day}")),
        f"{b}: " + _pick(rng, (f"I will be at the {place} at {time}", f"{day} at {time} is fine for me",
                               f"ok, the {place} on {day} then")),
        f"{a}: " + _pick(rng, (f"great, see you on {day}", f"good, {time} at the {place}", "perfect",
                               "ok, thanks!", "sounds good :)")),
    ]
    if rng.random() < 0.5:
        lines.append(f"{b}: " + _pick(rng, ("bye!", "see you", ":)", "ok", "thanks!", "don't be late!",
                                            f"can you bring the {_pick(rng, ITEMS)}?", "I'm on my way")))
    return "\n".join(lines)


def _note(rng):
    a, b = _cast(rng, 2)
    item, item2, day, time = _pick(rng, ITEMS), _pick(rng, ITEMS), _pick(rng, DAYS), _pick(rng, TIMES)
    place = _pick(rng, PLACES)
    return " ".join([
        f"Note for {b} from {a}:",
        _pick(rng, (f"please take the {item} to the {place} on {day}.", f"the {item} is at the {place}.",
                    f"I left the {item} for you at the {place}.")),
        _pick(rng, (f"We also need {item2}.", f"Don't forget the {item2}.", f"The {item2} is in the kitchen.")),
        _pick(rng, (f"I will be back at {time} on {day}.", f"Call me before {time}.", f"{a} will see {b} on {day}.")),
        f"Thanks, {a}.",
    ])


def _story(rng):
    a, b, c = _cast(rng, 3)
    place, place2, day, time = _pick(rng, PLACES), _pick(rng, PLACES), _pick(rng, DAYS), _pick(rng, TIMES)
    event, n = _pick(rng, EVENTS), _pick(rng, NUMBERS)
    return " ".join([
        f"{a} and {b} planned {event} for {day}.",
        _pick(rng, (f"It was going to be at the {place} at {time}.", f"They chose the {place} because it is quiet.",
                    f"{c} booked a table for {n} at the {place}.")),
        _pick(rng, (f"On {day} {c} was {n} minutes late.", f"{c} could not come on {day}.",
                    f"{c} came to the {place} with {_pick(rng, ITEMS)}.")),
        _pick(rng, (f"After {event} they walked to the {place2}.", f"{b} drove {a} home from the {place}.",
                    f"{a} thanked {b} and {c} for {event}.")),
        f"{b} said {event} on {day} was {_pick(rng, ('fun', 'long', 'great', 'too short'))}.",
    ])


def _timetable(rng):
    a = _cast(rng, 1)[0]
    days = [DAYS[int(i)] for i in np.sort(rng.choice(len(DAYS), size=3, replace=False))]
    parts = [f"{a}'s week:"]
    for day in days:
        parts.append(f"on {day} {a} goes to the {_pick(rng, PLACES)} at {_pick(rng, TIMES)}.")
    parts.append(f"On {days[-1]} {a} also has {_pick(rng, EVENTS)}.")
    return " ".join(parts)

# Chat threads: everyday messages with greetings, chit-chat and a plan whose people,
# places, days and times come back in later lines. Phrasings and chit-chat are this
# module's own (not the demo's dialogue generator's), so the base learns chat
# register and entity tracking without ever seeing a dialogue -> summary pair.
GREETINGS = ("hi", "hey", "hello", "morning", "evening", "hey you", "hiya", "good morning")
CHITCHAT = (
    "I slept so badly last night", "the weather is finally nice", "work was crazy today",
    "I started running again", "my brother is coming to stay", "the kids are finally asleep",
    "I found a great recipe for soup", "the train was late again", "did you watch the news?",
    "I need a holiday", "my laptop froze twice today", "the cat broke another glass",
    "I'm learning to play the piano", "we painted the kitchen yesterday", "I lost my favourite pen",
    "the concert tickets sold out in minutes", "I'm trying to drink less coffee", "the garden looks lovely",
    "my neighbour got a puppy", "I finished my exams", "it's raining again", "I can't wait for summer",
    "we went hiking in the mountains last weekend", "my cousins visited us for a few days",
    "what a game last night, did you see the finish?", "I can't believe how busy this month is",
    "the new job is fun and my team is nice", "it's freezing, I almost stayed in bed all morning",
    "I'm reading a book with very short chapters", "my phone battery is dying all the time",
    "I've been learning Spanish every evening", "I had to go to the dentist, it did hurt a bit",
    "our neighbours are building a new house", "what colour should I paint the bedroom?",
    "I cooked enough pasta for the whole week", "the traffic downtown was terrible this morning",
    "I was stuck on the bus for ages", "did you get the photos I sent?", "those photos look amazing",
    "my sister is visiting next month", "I can't find my glasses anywhere", "have you checked the car?",
    "there's a new series everyone is watching", "I only saw the first episode",
    "I'm so tired after this week", "I need a long sleep", "it's getting easier every day",
    "nothing fancy for dinner tonight", "tell her I said hi", "I really have to try it then",
    "my mum called this morning", "the shop on the corner closed", "I'm cooking tonight, any ideas?",
    "the football match was on TV", "my back hurts from the gym", "we should get a new sofa",
)
ANSWERS = (
    "oh really?", "same here", "haha nice", "good for you", "poor you", "I know the feeling",
    "that's great", "no way", "lucky you", "me too", "what happened?", "sounds lovely", "ugh",
)
SHORT = ("ok", "haha", "lol", "sure", "wait", "yes", "no", "right", "cool", "hmm", ":)", "thanks", "true")
PLAN_LINES = (
    ("shall we meet at the {place} on {day}?", "yes, {day} at {time} works", "good, the {place} at {time} then"),
    ("can you lend me the {item} on {day}?", "sure, you can have the {item}", "thanks, I'll get it on {day}"),
    ("I'm going to be {n} minutes late for {event}", "no problem, we'll start {event} later", "sorry again"),
    ("I can't come to {event} on {day}", "oh no, what happened?", "I'm ill, sorry about {day}"),
    ("I'm having a party at the {place} on {day}", "I'll be there!", "great, the {place} at {time}"),
    ("I booked a table for {n} at the {place}", "what time?", "at {time} on {day}"),
    ("remember to bring the {item} on {day}", "I won't forget the {item}", "good"),
    ("could you get {item} on the way?", "sure, anything else?", "just the {item}, thanks"),
    ("let's watch a {genre} film on {day}", "at the {place}?", "yes, at {time}"),
    ("I still have to {task} before {day}", "do you need help?", "no, I'll {task} on {day}"),
    ("did you {task}?", "not yet, I'll do it on {day}", "ok, don't forget"),
    ("can you pick me up from the {place}?", "when?", "at {time} on {day}"),
)


def _plan_slots(rng) -> dict[str, str]:
    """The place, day, time, ... a chat's plan may mention (each drawn, in this order)."""
    return dict(place=_pick(rng, PLACES), day=_pick(rng, DAYS), time=_pick(rng, TIMES), item=_pick(rng, ITEMS),
                event=_pick(rng, EVENTS), n=_pick(rng, NUMBERS), task=_pick(rng, TASKS), genre=_pick(rng, GENRES))


def _chat(rng):
    a, b, c = _cast(rng, 3)
    slots = _plan_slots(rng)
    return _chat_lines(rng, a, b, c, slots, _pick(rng, PLAN_LINES))


def _chat_lines(rng, a, b, c, slots, plan_lines, max_exchanges: int = 11) -> str:
    speakers = (a, b, c) if rng.random() < 0.3 else (a, b)
    lines = [(a, _pick(rng, GREETINGS) + _pick(rng, ("", f" {b}", "!"))), (b, _pick(rng, GREETINGS + ANSWERS))]
    for _ in range(int(rng.integers(0, max_exchanges + 1))):  # chit-chat: chats from 4 to ~30 lines
        first = _pick(rng, speakers)
        second = _pick(rng, tuple(s for s in speakers if s != first))
        lines += [(first, _pick(rng, CHITCHAT)), (second, _pick(rng, ANSWERS))]
        if rng.random() < 0.2:
            lines.append((_pick(rng, speakers), _pick(rng, SHORT)))
    ask, reply, close = plan_lines
    at = int(rng.integers(2, len(lines) + 1))
    plan = [(a, ask.format(**slots)), (b, reply.format(**slots)), (a, close.format(**slots))]
    lines = lines[:at] + plan + lines[at:]
    lines.append((_pick(rng, (a, b)), _pick(rng, ("bye", "see you", "ok", "thanks!", f"see you {slots['day']}"))))
    return "\n".join(f"{speaker}: {text}" for speaker, text in lines)


# What someone jotted down after a chat: the plan of PLAN_LINES[k] retold in the third
# person (a asked, b answered). Worded unlike the demo's summaries (fedjax_fm.data.synthetic),
# so the base learns to carry people, places and days from a chat into a sentence, not
# the demo's templates.
RECAPS = (
    "so on {day} at {time}, {a} and {b} are meeting up at the {place}",
    "{b} is lending the {item} to {a} for {day}",
    "{a} was {n} minutes behind for {event}",
    "{a} is missing {event} on {day}",
    "{b} is going to the party of {a} at the {place} on {day}",
    "the table at the {place} is for {n}, {day} at {time}, booked by {a}",
    "{b} brings the {item} on {day}, as {a} asked",
    "{b} is getting {item} for {a}",
    "on {day} at {time} {a} and {b} see a {genre} film at the {place}",
    "{a} must {task} before {day}",
    "{b} still needs to {task}, on {day}",
    "{b} is collecting {a} from the {place} on {day} at {time}",
)
RECAP_OPENERS = ("Later {writer} noted:", "{writer}'s notes:", "In {writer}'s diary:", "Reminder for {writer}:")


def _chat_note(rng):
    """A chat (:func:`_chat`) and a line someone wrote about its plan afterwards."""
    a, b, c = _cast(rng, 3)
    slots = _plan_slots(rng)
    k = int(rng.integers(len(PLAN_LINES)))
    # short chats (0-3 exchanges of chit-chat), so that the note still fits in a pretraining row
    chat = _chat_lines(rng, a, b, c, slots, PLAN_LINES[k], max_exchanges=3)
    opener = _pick(rng, RECAP_OPENERS).format(writer=_pick(rng, (a, b)))
    return f"{chat}\n{opener} {RECAPS[k].format(a=a, b=b, **slots)}."


KINDS = {"diary": _diary, "thread": _thread, "note": _note, "story": _story, "timetable": _timetable, "chat": _chat,
         "chat_note": _chat_note}


def entity_words() -> list[str]:
    """The words that name this corpus's entities (people, places, days, things, hours,
    genres, numbers): what salient span masking hides (``span_corruption.salient_noise_mask``)."""
    return [*NAMES, *PLACES, *DAYS, *ITEMS, *(t.split()[0] for t in TIMES), *GENRES, *NUMBERS]


def narrative(rng: np.random.Generator) -> str:
    """One text drawn from ``rng``."""
    return KINDS[_pick(rng, tuple(KINDS))](rng)


def narrative_corpus(num_texts: int, *, seed: int = 0) -> list[str]:
    """``num_texts`` texts; text ``i`` is drawn from ``default_rng([seed, i])`` (a larger
    corpus extends a smaller one with the same seed)."""
    return [narrative(np.random.default_rng([seed, i])) for i in range(num_texts)]


__all__ = ["KINDS", "entity_words", "narrative", "narrative_corpus"]
