"""Scores a demo run's summaries slot by slot: the right people, place and day (issue 15).

ROUGE-L rewards a summary's template as much as its facts; the issue asks for summaries
that name the right people, place and day. This loads a run's final parameters
(``training.use.load_trained``), summarises held-out synthetic dialogues greedily
(``training.use.summarize``) and counts, over them, how often

* people: the set of the dialogue cast's names in the prediction equals the reference's
  (and, stricter, "people in order": the sequence of names does, so that "Maya will bring
  the snacks" for "Sara will bring the snacks" after a first sentence naming both fails);
* place: every place of the reference (``synthetic.PLACES`` and ``RESTAURANTS``) is in the
  prediction (right by default where the reference names none);
* day: every day of the reference is in the prediction (likewise);
* all three hold at once;

and, per intent (``meet``, ``pickup``, ...), how often all three hold: the intents whose
summary names the *answering* speaker first (``pickup``, ``lend``, ``remind``, ``buy``) ask
more of a model than those that name the one who spoke first.

The dialogues are the demo's evaluation stream, ``synthetic_examples(N, seed=seed +
1_000_003)`` as ``data.federated.load_source`` draws it, so the first 64 are the run's own
held-out set and the rest extend it. The figures of docs/benchmarks.md ("Towards a
pretrained demo base") come from it.

Usage: ``python scripts/score_demo_slots.py RUN_DIR [--num 256]``.
"""

from __future__ import annotations

import argparse
import re


def slots(text: str, vocabulary) -> set[str]:
    """The words of ``vocabulary`` that ``text`` names (whole words)."""
    return {v for v in vocabulary if re.search(r"\b" + re.escape(v) + r"\b", text)}


def names_in_order(text: str, names) -> list[str]:
    """The names of ``names`` that ``text`` mentions, in the order it mentions them."""
    known = set(names)
    return [w for w in re.findall(r"[A-Za-z]+", text) if w in known]


def slot_scores(prediction: str, reference: str) -> dict[str, bool]:
    from fedjax_fm.data.synthetic import DAYS, NAMES, PLACES, RESTAURANTS

    return {
        "people": slots(prediction, NAMES) == slots(reference, NAMES),
        "people in order": names_in_order(prediction, NAMES) == names_in_order(reference, NAMES),
        "place": slots(reference, PLACES + RESTAURANTS) <= slots(prediction, PLACES + RESTAURANTS),
        "day": slots(reference, DAYS) <= slots(prediction, DAYS),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory of `fedjax-fm run` on the synthetic source (the demo)")
    parser.add_argument("--num", type=int, default=256, help="held-out dialogues to score")
    args = parser.parse_args(argv)

    from fedjax_fm.data.synthetic import synthetic_examples
    from fedjax_fm.training.use import load_trained, summarize

    trained = load_trained(args.run_dir, say=print)
    source = trained.cfg.data.source
    if source.kind != "synthetic":
        parser.error(f"{args.run_dir} trained on data.source.kind={source.kind!r}; this scores the synthetic demo")
    held_out = synthetic_examples(args.num, seed=trained.cfg.seed + 1_000_003, id_prefix="eval",
                                  small_talk_turns=tuple(source.small_talk_turns),
                                  extra_fact_prob=source.extra_fact_prob, lengths=source.lengths)
    print(f"summarising {args.num} held-out dialogues (greedy) ...", flush=True)
    predictions = summarize(trained, held_out.inputs, batch_size=32)
    scores = [slot_scores(p, r) for p, r in zip(predictions, held_out.targets)]
    for slot in ("people", "people in order", "place", "day"):
        print(f"{slot:>15} right: {sum(s[slot] for s in scores) / len(scores):6.1%}")
    three = [s["people"] and s["place"] and s["day"] for s in scores]
    print(f"all three right: {sum(three) / len(scores):6.1%} of {len(scores)}")
    by_intent: dict[str, list[bool]] = {}
    for intent, right in zip(held_out.columns["intent"], three):
        by_intent.setdefault(intent, []).append(right)
    print("all three right, by intent: " + ", ".join(
        f"{intent} {sum(right)}/{len(right)}" for intent, right in sorted(by_intent.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
