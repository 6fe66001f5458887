"""Does a model copy people, places and days from its input? A one-minute probe (issue 15).

The demo's summaries must name the dialogue's people, place and day, which a model can
only do by *copying* them from the dialogue. Scoring that through a whole pretrain ->
fine-tune -> summarise loop takes ~15 minutes; this probe asks the question directly,
teacher-forced, in under a minute:

* **A base** (a folder with ``config.json``, e.g. ``fedjax_fm/assets/demo_base``): in
  held-out texts of its pretraining corpus's generator (``narratives``, drawn with a seed
  the corpus does not use), one mention of an entity that the text names twice is
  replaced by the sentinel ``<extra_id_0>``, exactly as span corruption hides it, and the
  model's next token after ``<extra_id_0>`` is read. Score: how often the right entity
  is the most likely of its class (top-1 among the class's tokens), against chance
  ``1 / |class|``. A model that copies scores near 1; one that ignores the visible copy
  and falls back on a prior scores near chance, whatever its loss. A fourth line hides
  one random *non-entity* token per text ("other", top-1 over the whole vocabulary):
  only the sentinel's neighbourhood tells what it hides.
* **A run** (a ``fedjax-fm run`` directory on the synthetic demo): on held-out dialogues
  whose reference names exactly one entity of the class, the reference is teacher-forced
  and the model's distribution at the entity's position is read: top-1 among the class.
  Then the entity is swapped for another of its class *in the dialogue and the
  reference alike*; a model that copies follows the swap (top-1 on the new entity), one
  that ignores the dialogue does not.

For each class it prints ``n``, top-1, chance and the model's most frequent top-1 (a
prior that wins everywhere shows up there). Figures: docs/benchmarks.md ("Offline demo",
"Why the span-corruption base copied no place").

Usage::

    python scripts/probe_entity_copying.py fedjax_fm/assets/demo_base [--num 600]
    python scripts/probe_entity_copying.py RUN_DIR [--num 256]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import numpy as np

HELD_OUT_SEED = 7  # the pretraining corpus is drawn with seed 0 (scripts/pretrain_demo_base.py)
INPUT_SLOTS = 256  # a base's probe input length (the narratives' texts have at most ~230 tokens)


def class_ids(tokenizer, words) -> dict[str, int]:
    """``word -> token id`` for the words the tokenizer spells as one piece (others cannot
    be scored as a single next token, and are left out)."""
    out = {}
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out[word] = ids[0]
    return out


def hide_one_mention(tokens: np.ndarray, entity_id: int, sentinel_id: int, eos_id: int) -> np.ndarray | None:
    """``tokens`` with the last mention of ``entity_id`` replaced by ``sentinel_id``, and EOS
    appended (T5's span-corruption input for that one noise span); None unless the entity
    is mentioned at least twice, so that a copy stays visible."""
    positions = np.flatnonzero(tokens == entity_id)
    if len(positions) < 2:
        return None
    hidden = tokens.copy()
    hidden[positions[-1]] = sentinel_id
    return np.concatenate([hidden, [eos_id]]).astype(np.int32)


def rank_among(log_probs: np.ndarray, candidates: np.ndarray, right: int) -> int:
    """How many of ``candidates`` (token ids) score above ``right``: 0 means top-1."""
    return int((log_probs[candidates] > log_probs[right]).sum())


def summarise(kind: str, ranks: list[int], tops: list[str], class_size: int) -> str:
    if not ranks:
        return f"{kind:>7}: no case"
    ranks_ = np.asarray(ranks)
    common = ", ".join(f"{w} {n}" for w, n in Counter(tops).most_common(3))
    return (f"{kind:>7}: n={len(ranks):4d} top-1 {np.mean(ranks_ == 0):6.1%} (chance {1 / class_size:5.1%}, "
            f"{class_size} in class); most often top-1: {common}")


def probe_base(base_dir: str, num_texts: int) -> dict[str, float]:
    """Prints the base probe (module docstring); returns each class's top-1 rate."""
    import jax
    import jax.numpy as jnp

    from fedjax_fm.data import narratives
    from fedjax_fm.models.hf_io import from_pretrained
    from fedjax_fm.models.tokenizer import load_tokenizer

    model, params = from_pretrained(base_dir)
    tokenizer = load_tokenizer(base_dir)
    sentinel = len(tokenizer) - 1
    if tokenizer.convert_ids_to_tokens(sentinel) != "<extra_id_0>":
        raise SystemExit(f"{base_dir}: its tokenizer's last id is not <extra_id_0>; not a span-corruption base")

    @jax.jit
    def next_log_probs(inputs):
        decoder_inputs = jnp.asarray([[model.config.decoder_start_token_id, sentinel]], jnp.int32)
        mask = (inputs != model.config.pad_token_id).astype(jnp.int32)
        logits = model.apply({"params": params}, inputs, mask, decoder_inputs)
        return jax.nn.log_softmax(logits[0, 1])

    def padded(inputs: np.ndarray) -> jnp.ndarray:  # one shape for every text: one compilation
        return jnp.asarray(np.pad(inputs, (0, INPUT_SLOTS - len(inputs)))[None])

    texts = narratives.narrative_corpus(num_texts, seed=HELD_OUT_SEED)
    token_lists = [np.asarray(ids, np.int32) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    print(f"{base_dir}: {num_texts} held-out texts (narratives seed {HELD_OUT_SEED}); the last of two or more "
          f"mentions hidden", flush=True)
    top1 = {}
    for kind, words in (("people", narratives.NAMES), ("place", narratives.PLACES), ("day", narratives.DAYS)):
        ids = class_ids(tokenizer, words)
        candidates = np.asarray(list(ids.values()))
        by_id = {i: w for w, i in ids.items()}
        ranks, tops = [], []
        for tokens in token_lists:
            for word, entity in ids.items():
                inputs = hide_one_mention(tokens[: INPUT_SLOTS - 1], entity, sentinel, model.config.eos_token_id)
                if inputs is None:
                    continue
                log_probs = np.asarray(next_log_probs(padded(inputs)))
                ranks.append(rank_among(log_probs, candidates, entity))
                tops.append(by_id[int(candidates[np.argmax(log_probs[candidates])])])
        print(summarise(kind, ranks, tops, len(ids)), flush=True)
        top1[kind] = float(np.mean(np.asarray(ranks) == 0)) if ranks else float("nan")
    top1["other"] = _probe_other_tokens(tokenizer, token_lists, next_log_probs, padded, sentinel,
                                        model.config.eos_token_id)
    return top1


def _probe_other_tokens(tokenizer, token_lists, next_log_probs, padded, sentinel: int, eos_id: int) -> float:
    """One random non-entity token of each text hidden ("went <extra_id_0> the"): top-1
    over the whole vocabulary. Only the sentinel's neighbourhood tells what it hides, so a
    base that has not learnt *where* its sentinel stands scores near 0 however well it
    knows which entities a text holds."""
    from fedjax_fm.data import narratives

    entity_ids = set()
    for word in narratives.entity_words():
        entity_ids.update(tokenizer(word, add_special_tokens=False)["input_ids"])
    rng = np.random.default_rng(HELD_OUT_SEED)
    hits, tops = [], []
    for tokens in token_lists:
        tokens = tokens[: INPUT_SLOTS - 1]
        where = [i for i, t in enumerate(tokens) if int(t) not in entity_ids]
        if not where:
            continue
        i = where[int(rng.integers(len(where)))]
        hidden = tokens.copy()
        hidden[i] = sentinel
        log_probs = np.asarray(next_log_probs(padded(np.concatenate([hidden, [eos_id]]).astype(np.int32))))
        best = int(np.argmax(log_probs))
        hits.append(best == int(tokens[i]))
        tops.append(tokenizer.convert_ids_to_tokens(best))
    common = ", ".join(f"{w} {n}" for w, n in Counter(tops).most_common(3))
    rate = float(np.mean(hits)) if hits else float("nan")
    print(f"{'other':>7}: n={len(hits):4d} top-1 {rate:6.1%} (one non-entity token per text, over the whole "
          f"vocabulary); most often top-1: {common}", flush=True)
    return rate


def probe_run(run_dir: str, num_dialogues: int) -> None:
    import jax
    import jax.numpy as jnp

    from fedjax_fm.data import synthetic
    from fedjax_fm.data.tokenize import format_prompts
    from fedjax_fm.models.loss import shift_right
    from fedjax_fm.training.use import load_trained

    trained = load_trained(run_dir, say=print)
    cfg, tokenizer, model = trained.cfg, trained.tokenizer, trained.model
    if cfg.data.source.kind != "synthetic":
        raise SystemExit(f"{run_dir} trained on data.source.kind={cfg.data.source.kind!r}; this probes the demo")
    source = cfg.data.source
    held_out = synthetic.synthetic_examples(num_dialogues, seed=cfg.seed + 1_000_003, id_prefix="eval",
                                            small_talk_turns=tuple(source.small_talk_turns),
                                            extra_fact_prob=source.extra_fact_prob, lengths=source.lengths)

    @jax.jit
    def log_probs_fn(inputs, mask, decoder_inputs):
        return jax.nn.log_softmax(model.apply(trained.variables, inputs, mask, decoder_inputs), -1)

    def log_probs_at(dialogue: str, reference: str, entity: int) -> np.ndarray | None:
        prompt = format_prompts(cfg.data.prompt_template, [dialogue])
        # padded to fixed lengths: one compilation for every dialogue
        encoded = tokenizer(prompt, max_length=cfg.data.max_input_length, truncation=True, padding="max_length",
                            return_tensors="np")
        labels = tokenizer([reference], max_length=cfg.data.max_target_length, truncation=True, padding="max_length",
                           return_tensors="np")["input_ids"].astype(np.int32)
        where = np.flatnonzero(labels[0] == entity)
        if len(where) == 0:
            return None
        decoder_inputs = shift_right(jnp.asarray(labels), model.config.decoder_start_token_id, model.config.pad_token_id)
        out = log_probs_fn(jnp.asarray(encoded["input_ids"], jnp.int32), jnp.asarray(encoded["attention_mask"], jnp.int32),
                           decoder_inputs)
        return np.asarray(out[0, where[0]])

    print(f"{run_dir}: {num_dialogues} held-out dialogues, reference teacher-forced", flush=True)
    rng = np.random.default_rng(HELD_OUT_SEED)
    for kind, words in (("people", synthetic.NAMES), ("place", synthetic.PLACES), ("day", synthetic.DAYS)):
        ids = class_ids(tokenizer, words)
        candidates = np.asarray(list(ids.values()))
        by_id = {i: w for w, i in ids.items()}
        results = {"as drawn": ([], []), "swapped": ([], [])}
        for dialogue, reference in zip(held_out.inputs, held_out.targets):
            named = [w for w in ids if re.search(rf"\b{re.escape(w)}\b", reference)]
            if kind != "people" and len(named) != 1:
                continue
            if not named:
                continue
            word = named[0]  # for people: the first name of the reference
            other = word
            while other == word:
                other = list(ids)[int(rng.integers(len(ids)))]
            swap = re.compile(rf"\b{re.escape(word)}\b")
            for label, (d, r, w) in (("as drawn", (dialogue, reference, word)),
                                     ("swapped", (swap.sub(other, dialogue), swap.sub(other, reference), other))):
                log_probs = log_probs_at(d, r, ids[w])
                if log_probs is None:
                    continue
                results[label][0].append(rank_among(log_probs, candidates, ids[w]))
                results[label][1].append(by_id[int(candidates[np.argmax(log_probs[candidates])])])
        for label, (ranks, tops) in results.items():
            print(summarise(kind, ranks, tops, len(ids)) + f" [{label}]", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a pretrained base folder (config.json) or a `fedjax-fm run` directory")
    parser.add_argument("--num", type=int, default=None,
                        help="held-out texts (base; default 600) or dialogues (run; default 256)")
    args = parser.parse_args(argv)
    path = Path(args.model_dir)
    if (path / "config.yaml").is_file():
        probe_run(args.model_dir, args.num or 256)
    elif (path / "config.json").is_file():
        probe_base(args.model_dir, args.num or 600)
    else:
        parser.error(f"{path} holds neither config.yaml (a run) nor config.json (a pretrained base)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
