"""Using a trained run: ``fedjax-fm summarize RUN_DIR`` and ``fedjax-fm eval RUN_DIR``.

Both rebuild the run from what it left in its folder and change nothing in it:

* ``DIR/config.yaml`` -- the config the run used;
* ``DIR/tokenizer/`` -- the tokenizer it trained (``train-sentencepiece``), if any;
* ``DIR/checkpoints/`` -- the newest readable checkpoint holds the final trainable
  parameters (the last round is always checkpointed); the frozen base is rebuilt from
  the seed or the pretrained checkpoint exactly as the run built it.

``summarize`` prompts new texts with the run's template and generates (greedy, or
beam search with ``--num-beams``). ``eval`` evaluates the final parameters on the
run's evaluation split, or on a file (``--data``, JSON/JSONL/CSV), with ``--set
eval.*`` overrides, and writes the result to a new file ``DIR/evals/eval-<n>.json``;
``config.yaml`` is never rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
import yaml

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict
from fedjax_fm.data.batching import eval_batches
from fedjax_fm.data.local_files import read_examples
from fedjax_fm.data.records import DataError
from fedjax_fm.data.tokenize import format_prompts, tokenize_examples
from fedjax_fm.eval.evaluate import trim_generated
from fedjax_fm.models.generate import generate
from fedjax_fm.models.hf_io import HFCheckpointError
from fedjax_fm.models.t5 import T5
from fedjax_fm.training import builders
from fedjax_fm.training.checkpoint import CheckpointError, CheckpointStore
from fedjax_fm.training.record import RunError, json_safe


@dataclasses.dataclass
class TrainedRun:
    """A run's config, tokenizer, model and final variables (``{"params", ["lora"]}``)."""

    cfg: ExperimentConfig
    run_dir: Path
    round: int
    tokenizer: Any
    model: T5
    variables: dict[str, Any]


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config the run in ``run_dir`` used (``config.yaml``), with ``overrides`` applied."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(f"{path} does not exist: is {run_dir} a fedjax-fm run directory (made by `fedjax-fm run`)?")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def load_trained(run_dir: str | Path, overrides: Sequence[str] = (), *,
                 say: Callable[[str], None] = lambda message: None) -> TrainedRun:
    """Rebuilds the run in ``run_dir`` with its final parameters (module docstring)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    if not cfg.checkpoint.enabled or not (run_dir / "checkpoints").is_dir():
        raise RunError(f"{run_dir} has no checkpoints/ (the run had checkpoint.enabled false); its final "
                       f"parameters are only in {run_dir / 'export'} -- load that with transformers")
    tokenizer = builders.build_tokenizer(cfg, run_dir, lambda: builders.training_texts(cfg))
    model, variables = builders.build_model(cfg, tokenizer)
    trainable, frozen = fl.split_variables(variables, fl.trainable_collections(cfg.lora is not None))
    # The state's structure (parameters, optimiser state, round, key) is the checkpoint's template.
    template = builders.build_algorithm(cfg, model).init(trainable, cfg.seed)
    store = CheckpointStore(run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    try:
        restored = store.restore_latest(template, on_skip=lambda e: say(f"skipping checkpoint: {e}"))
    finally:
        store.close()
    if restored is None:
        raise RunError(f"{run_dir / 'checkpoints'} holds no checkpoint yet: the run has not finished a round")
    say(f"loaded round {restored.round} of {run_dir} ({restored.path})")
    return TrainedRun(cfg, run_dir, restored.round, tokenizer, model,
                      fl.join_variables(restored.state.params, frozen))


def summarize(trained: TrainedRun, texts: Sequence[str], *, num_beams: int = 1,
              max_new_tokens: Optional[int] = None, batch_size: int = 8) -> list[str]:
    """Summaries of ``texts`` (prompted with the run's template, truncated to its input length)."""
    cfg = trained.cfg
    prompts = format_prompts(cfg.data.prompt_template, list(texts))
    decode = builders.decoder(trained.tokenizer)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = trained.tokenizer(chunk, max_length=cfg.data.max_input_length, truncation=True,
                                    padding="max_length", return_tensors="np")
        ids = generate(trained.model, trained.variables, np.asarray(encoded["input_ids"], np.int32),
                       np.asarray(encoded["attention_mask"], np.int32),
                       max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, num_beams=num_beams,
                       length_penalty=cfg.eval.length_penalty)
        for row in np.asarray(jax.device_get(ids)):
            out.append(decode(trim_generated(row, trained.model.config.eos_token_id, trained.model.config.pad_token_id)))
    return out


@dataclasses.dataclass
class _FileEvalSet:
    """Evaluation examples from one file, in the shape ``builders.build_evaluator`` reads."""

    tokens: Any
    references: list[str]
    ids: list[str]

    def eval_batches(self, batch_size: int, max_examples: Optional[int] = None,
                     by_length: bool = False) -> Iterator[dict]:
        n = len(self.references) if max_examples is None else min(max_examples, len(self.references))
        t = self.tokens
        tokens = type(t)(t.input_ids[:n], t.input_lengths[:n], t.labels[:n], t.label_lengths[:n])
        return eval_batches(tokens, self.references[:n], batch_size, ids=self.ids[:n], by_length=by_length)


def evaluate(trained: TrainedRun, data_path: Optional[str] = None) -> dict[str, Any]:
    """Loss and ROUGE of the final parameters on the run's evaluation split or on ``data_path``."""
    cfg = trained.cfg
    if data_path is None:
        data = builders.build_data(cfg, trained.tokenizer)
        source = "the run's evaluation split"
    else:
        s = cfg.data.source
        examples = read_examples(data_path, input_field=s.input_field or "dialogue",
                                 target_field=s.target_field or "summary", id_field=s.id_field,
                                 skip_invalid=s.skip_invalid)
        tokens, _ = tokenize_examples(examples, trained.tokenizer, prompt_template=cfg.data.prompt_template,
                                      max_input_length=cfg.data.max_input_length,
                                      max_target_length=cfg.data.max_target_length)
        data = _FileEvalSet(tokens, list(examples.targets), list(examples.ids))
        source = str(data_path)
    result = builders.build_evaluator(cfg, trained.model, trained.tokenizer, data)(trained.variables)
    return {
        "run": str(trained.run_dir),
        "round": trained.round,
        "data": source,
        "num_examples": len(result.references),
        "eval": {k: v for k, v in config_to_dict(cfg)["eval"].items()},
        **{k: json_safe(v) for k, v in result.metrics().items()},
        "examples": [{"prediction": p, "reference": r} for p, r in zip(result.predictions[:5], result.references[:5])],
    }


def _next_eval_path(run_dir: Path) -> Path:
    folder = run_dir / "evals"
    folder.mkdir(exist_ok=True)
    taken = {int(p.stem.split("-")[1]) for p in folder.glob("eval-*.json") if p.stem.split("-")[1].isdigit()}
    return folder / f"eval-{max(taken, default=0) + 1}.json"


# ----------------------------------------------------------------------------- CLI

_ERRORS = (ConfigError, RunError, CheckpointError, HFCheckpointError, DataError, FileNotFoundError)


def _eval_overrides(values: Sequence[str]) -> list[str]:
    bad = [v for v in values if not v.strip().startswith("eval.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only eval.* settings may change when evaluating a trained run")
    return list(values)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summarize_command(args: argparse.Namespace) -> int:
    try:
        if args.text is not None:
            texts = list(args.text)
        else:
            path = Path(args.file)
            if not path.is_file():
                raise FileNotFoundError(f"--file {path}: no such file")
            texts = [block.strip() for block in path.read_text().split("\n\n") if block.strip()]
        if not texts:
            raise RunError("nothing to summarise: --text is empty or --file holds no text")
        trained = load_trained(args.run_dir, say=_say)
        summaries = summarize(trained, texts, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    except _ERRORS as error:
        print(f"fedjax-fm summarize: error: {error}", file=sys.stderr)
        return 2
    for summary in summaries:
        print(summary)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    try:
        trained = load_trained(args.run_dir, _eval_overrides(args.set), say=_say)
        result = evaluate(trained, args.data)
    except _ERRORS as error:
        print(f"fedjax-fm eval: error: {error}", file=sys.stderr)
        return 2
    path = _next_eval_path(Path(args.run_dir))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("round", "data", "num_examples", "eval_loss", "rougeL")}))
    _say(f"written to {path} (the run's config.yaml and summary.json are unchanged)")
    return 0


def add_use_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``fedjax-fm summarize RUN_DIR`` and ``fedjax-fm eval RUN_DIR``."""
    summarize_parser = subparsers.add_parser(
        "summarize", help="summarise new text with a trained run",
        description="Summarise text with the final parameters of a run (its newest checkpoint), prompted and "
                    "truncated as the run was trained. Prints one summary per text.")
    summarize_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `fedjax-fm run`")
    source = summarize_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", metavar="TEXT", help="a text to summarise (repeatable)")
    source.add_argument("--file", metavar="PATH", help="a text file; texts separated by blank lines")
    summarize_parser.add_argument("--num-beams", type=int, default=1, help="1: greedy (default); >1: beam search")
    summarize_parser.add_argument("--max-new-tokens", type=int, default=None,
                                  help="the summary's length limit (default: the run's eval.max_new_tokens)")
    summarize_parser.set_defaults(func=_summarize_command)

    eval_parser = subparsers.add_parser(
        "eval", help="evaluate a trained run (loss, ROUGE) without changing it",
        description="Evaluate the final parameters of a run on its evaluation split or on --data, and write the "
                    "result to RUN_DIR/evals/eval-<n>.json. The run's config.yaml is never rewritten.")
    eval_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `fedjax-fm run`")
    eval_parser.add_argument("--data", metavar="PATH", default=None,
                             help="a JSON/JSONL/CSV file of examples (the run's data.source field names)")
    eval_parser.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                             help="override an eval.* setting (repeatable), e.g. --set eval.num_beams=4")
    eval_parser.set_defaults(func=_eval_command)
