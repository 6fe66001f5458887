"""Benchmark the data pipeline: tokenising and partitioning 15,000 SAMSum-sized examples,
and the share of a training round spent producing that round's batches.

SAMSum-sized examples come from the synthetic generator with more small talk and an
extra fact per dialogue (~95 words per dialogue; SAMSum's mean is ~94). The tokenizer
is a T5-style SentencePiece unigram model trained on that corpus with
``fedjax_fm.models.tokenizer.train_sentencepiece_tokenizer`` (``--vocab-size``).

Round time is measured in the same run: the project's jitted client update
(``fedjax_fm.fl.client.make_client_update``, AdamW, ``lax.scan`` over local steps)
on the same ``[steps, B, S]`` batches, for the ``tiny`` preset (d_model 64, 2+2 layers)
and optionally (``--flan-t5-small``) for ``flan-t5-small`` (random init, float32). Clients run one after another, so
a round's compute time is ``clients x`` one client's update; the data time is one
``clients_round_batches`` call producing all of them. Ratio = data / (data + compute). The script also prints the local step time above
which the data share stays under 2 %, which carries over to faster hardware.

    python scripts/bench_data.py                # full run
    python scripts/bench_data.py --quick        # small sizes, for a smoke test
    python scripts/bench_data.py --learn-seconds 240   # only: can a tiny T5 learn the synthetic task?
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

try:  # run from a checkout without installing
    import fedjax_fm  # noqa: F401
except ImportError:
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _timed(fn, repeats=1):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def learnability(seconds: float) -> None:
    """Train the ``tiny`` preset centrally on default synthetic dialogues for ``seconds``,
    then greedy-decode 64 held-out dialogues and print ROUGE-1 F and exact-match rate."""
    import tempfile as _tempfile

    import jax
    import optax
    from rouge_score import rouge_scorer

    from fedjax_fm.data import DataSpec, LocalWork, SourceSpec, build_federated_data, synthetic_tokenizer
    from fedjax_fm.models import T5, batch_loss, generate, init_params, preset

    with _tempfile.TemporaryDirectory() as tmp:
        tokenizer = synthetic_tokenizer(tmp)
    spec = DataSpec(source=SourceSpec(num_train=4000, num_eval=64), max_input_length=160, max_target_length=40)
    data = build_federated_data(spec, tokenizer, seed=0, num_clients=1, local_work=LocalWork(32, steps=50),
                                eval_batch_size=64)
    config = preset("tiny")
    model = T5(config)
    params = init_params(config, jax.random.PRNGKey(0))
    optimizer = optax.adamw(3e-3)

    @jax.jit
    def fifty_steps(params, opt_state, batches):
        def step(carry, batch):
            p, s = carry
            (loss, _), g = jax.value_and_grad(lambda q: batch_loss(model, {"params": q}, batch), has_aux=True)(p)
            u, s = optimizer.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses.mean()

    opt_state, start, r = optimizer.init(params), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        params, opt_state, loss = fifty_steps(params, opt_state, data.client_round_batches(0, r))
        r += 1
        print(f"{time.perf_counter() - start:7.1f} s  step {50 * r:5d}  loss {float(loss):.3f}", flush=True)
    batch = next(data.eval_batches())
    out = generate(model, {"params": params}, batch["input_ids"], batch["attention_mask"], max_new_tokens=40)
    predictions = tokenizer.batch_decode(np.asarray(out), skip_special_tokens=True)
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    rouge1 = np.mean([scorer.score(t, p)["rouge1"].fmeasure for t, p in zip(batch["references"], predictions)])
    exact = np.mean([t.strip() == p.strip() for t, p in zip(batch["references"], predictions)])
    print(f"tiny T5 after {50 * r} steps ({time.perf_counter() - start:.0f} s): ROUGE-1 F {rouge1:.3f}, "
          f"exact match {exact:.3f} on 64 held-out dialogues")
    for t, p in list(zip(batch["references"], predictions))[:3]:
        print(f"  reference: {t}\n  predicted: {p}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=15_000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--clients", type=int, default=100, help="clients the dataset is partitioned over")
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-input-length", type=int, default=512)
    parser.add_argument("--max-target-length", type=int, default=128)
    parser.add_argument("--model-steps", type=int, default=2, help="local steps timed for flan-t5-small")
    parser.add_argument("--flan-t5-small", action="store_true",
                        help="also time flan-t5-small local steps (minutes per step on a small CPU)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--learn-seconds", type=float, default=None,
                        help="only run the learnability check of the synthetic task for this long")
    args = parser.parse_args(argv)
    if args.learn_seconds is not None:
        learnability(args.learn_seconds)
        return 0
    if args.quick:
        args.examples, args.vocab_size, args.clients = 1500, 1000, 10

    import jax
    import jax.numpy as jnp

    from fedjax_fm.data import (
        ClientPartitionSpec,
        DataSpec,
        LocalWork,
        SourceSpec,
        dirichlet_group_partition,
        dirichlet_quantity_partition,
        iid_partition,
        synthetic_examples,
        tokenize_examples,
    )
    from fedjax_fm.data.federated import build_federated_data
    from fedjax_fm.fl.client import client_optimizer, make_client_update
    from fedjax_fm.fl.t5_task import t5_loss_fn, t5_partition
    from fedjax_fm.models import T5, init_params, preset
    from fedjax_fm.models.tokenizer import train_sentencepiece_tokenizer

    rows: list[tuple[str, str]] = []
    gen_s, examples = _timed(lambda: synthetic_examples(args.examples, seed=0, small_talk_turns=(3, 5), extra_fact_prob=1.0, lengths="small_talk"))
    words_in = np.mean([len(x.split()) for x in examples.inputs])
    words_out = np.mean([len(x.split()) for x in examples.targets])
    rows.append(("generate examples", f"{gen_s:.2f} s  ({words_in:.0f} words/dialogue, {words_out:.0f} words/summary)"))

    with tempfile.TemporaryDirectory() as tmp:
        train_s, tokenizer = _timed(lambda: train_sentencepiece_tokenizer(
            [f"summarize: {x}" for x in examples.inputs] + examples.targets, tmp, args.vocab_size))
    rows.append(("train SentencePiece (not per run)", f"{train_s:.2f} s  (vocab {len(tokenizer)})"))

    tok_s, (tokens, report) = _timed(lambda: tokenize_examples(
        examples, tokenizer, max_input_length=args.max_input_length, max_target_length=args.max_target_length))
    n_tok = int(tokens.input_lengths.sum() + tokens.label_lengths.sum())
    rows.append(("tokenise + pad (once per dataset)",
                 f"{tok_s:.2f} s  ({args.examples / tok_s:,.0f} examples/s, {n_tok / tok_s:,.0f} tokens/s; "
                 f"mean {report.input_length_mean:.0f}/{report.target_length_mean:.0f} tokens, "
                 f"{report.inputs_truncated}+{report.targets_truncated} truncated)"))

    groups = examples.columns["intent"]
    for name, fn in (
        ("partition IID", lambda: iid_partition(len(examples), args.clients, seed=0)),
        ("partition Dirichlet quantity a=0.5", lambda: dirichlet_quantity_partition(len(examples), args.clients, 0.5, seed=0)),
        ("partition Dirichlet intent a=0.5", lambda: dirichlet_group_partition(groups, args.clients, 0.5, seed=0)),
    ):
        seconds, _ = _timed(fn, repeats=3)
        rows.append((name, f"{seconds * 1e3:.1f} ms  ({args.clients} clients)"))

    # The runner's path: build once (tokenises again; this is what a run pays), then rounds.
    spec = DataSpec(
        source=SourceSpec(kind="synthetic", num_train=args.examples, num_eval=8, small_talk_turns=(3, 5), extra_fact_prob=1.0, lengths="small_talk"),
        partition=ClientPartitionSpec(method="iid"),
        max_input_length=args.max_input_length, max_target_length=args.max_target_length,
    )
    work = LocalWork(args.batch_size, epochs=1.0)
    build_s, data = _timed(lambda: build_federated_data(spec, tokenizer, seed=0, num_clients=args.clients,
                                                        local_work=work, eval_batch_size=args.batch_size))
    rows.append(("build_federated_data (generate+tokenise+partition)", f"{build_s:.2f} s"))
    steps, c = data.steps_per_round, args.clients_per_round
    sampled = [list(range(r * c, (r + 1) * c)) for r in range(args.clients // c)]
    data_times = []
    for r in range(20):
        clients = sampled[r % len(sampled)]
        start = time.perf_counter()
        batches = data.clients_round_batches(clients, r)
        data_times.append(time.perf_counter() - start)
    round_data_s = statistics.median(data_times)
    shape = tuple(batches["input_ids"].shape)
    rows.append((f"round batches {shape}", f"{round_data_s * 1e3:.2f} ms median of 20 rounds"))

    def client_step_time(model_name: str, num_steps: int) -> float:
        config = preset(model_name, vocab_size=max(len(tokenizer), 128), dropout_rate=0.0)
        model = T5(config)
        params = init_params(config, jax.random.PRNGKey(0))
        trainable, frozen = t5_partition(params)
        update = jax.jit(make_client_update(t5_loss_fn(model, dropout=False), client_optimizer("adamw", learning_rate=1e-4)))
        one = data.client_round_batches(0, 0)
        one = {k: jnp.asarray(v[:num_steps]) for k, v in one.items()}
        jax.block_until_ready(update(trainable, frozen, one, jax.random.PRNGKey(1)))  # compile
        seconds, _ = _timed(lambda: jax.block_until_ready(update(trainable, frozen, one, jax.random.PRNGKey(1))), repeats=2)
        return seconds / num_steps

    # The data time that would still be 2 % of a round: any slower local step keeps it below.
    break_even = round_data_s * (0.98 / 0.02) / (steps * c)
    rows.append(("local step time at which data = 2 % of a round", f"{break_even * 1e3:.2f} ms/step"))
    references = [("tiny", min(steps, 4))]
    if args.flan_t5_small:
        references.append(("flan-t5-small", args.model_steps))
    for model_name, timed_steps in references:
        per_step = client_step_time(model_name, timed_steps)
        round_compute = per_step * steps * c
        share = round_data_s / (round_data_s + round_compute)
        rows.append((f"{model_name}: local step (B={args.batch_size}, S={args.max_input_length})",
                     f"{per_step * 1e3:.1f} ms/step (timed over {timed_steps} steps)"))
        rows.append((f"{model_name}: round compute ({c} clients x {steps} steps)", f"{round_compute:.2f} s"))
        rows.append((f"{model_name}: data share of round", f"{100 * share:.3g} %  (target < 2 %)"))

    width = max(len(k) for k, _ in rows)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.examples} examples, "
          f"{args.clients} clients, {c} per round")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
