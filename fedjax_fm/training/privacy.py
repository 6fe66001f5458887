"""DP-FedAvg in the run layer: the ``federated.dp`` config section made into a run.

What a run with ``federated.dp`` does differently (``docs/federated.md``, "Differential privacy")::

    refuse settings the accountant cannot vouch for    fl.validate_dp_config -> ConfigError
    algorithm   = fl.dp_fedavg.DPFedAvg                 clip, uniform, noise; C in the server state
    sampling    = Poisson(q) (padded to a static cap; padded slots train on zero-weight batches
                  and contribute zero) or fixed-size K without replacement — what the ledger assumes
    after each round: ledger.record_rounds(1); row["dp_epsilon"] = ε at δ so far
    stop before the round that would exceed federated.dp.target_epsilon (when set)

The ledger is rebuilt on ``--resume`` from the round count (self-composition is
exact), so a resumed run reports the same ε trajectory as an uninterrupted one.
The population ``N`` is the number of clients the data actually has (after any
client was dropped for having no example), not ``federated.num_clients``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, ExperimentConfig
from fedjax_fm.fl.accountant import DPConfigError, PrivacyLedger, max_rounds_within, validate_dp_config
from fedjax_fm.fl.dp_fedavg import DPFedAvg
from fedjax_fm.fl.privacy import AdaptiveClipping, dp_fedavg_aggregator

# metrics.jsonl fields of a DP run (null without DP); appended to METRIC_FIELDS.
PRIVACY_FIELDS = ("dp_epsilon", "dp_delta", "dp_clip_norm", "dp_noise_stddev")

GUARANTEE = ("client-level (ε, δ)-DP, central Gaussian noise (the server is trusted with individual clipped "
             "updates); neighbours: {relation}; accountant: dp_accounting {accountant}")


def default_delta(population: int) -> float:
    """``min(1e-5, 0.1 / N)``: well below ``1/N``, as a meaningful guarantee needs (set your own with
    ``federated.dp.delta``)."""
    return min(1e-5, 0.1 / float(population))


class RunPrivacy:
    """The DP settings of one run, its sampler and its ledger (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, population: int):
        f = cfg.federated
        dp = f.dp
        assert dp is not None
        self.cfg = cfg
        self.population = int(population)
        self.sampling = dp.sampling
        self.clients_per_round = min(f.clients_per_round, self.population)
        self.q = (dp.sampling_rate if dp.sampling_rate is not None else self.clients_per_round / self.population)
        self.delta = dp.delta if dp.delta is not None else default_delta(self.population)
        self.noise_multiplier = dp.noise_multiplier
        self.accountant = dp.accountant
        ad = dp.adaptive_clipping
        self.adaptive = None if ad is None else AdaptiveClipping(ad.target_quantile, ad.learning_rate, ad.count_stddev)
        try:
            validate_dp_config(
                noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm, delta=self.delta,
                population=self.population, sampling=dp.sampling,
                q=self.q if dp.sampling == "poisson" else None, clients_per_round=self.clients_per_round,
                weighting=f.weighting or "uniform", accountant=dp.accountant, min_clients=f.min_clients,
                adaptive_target_quantile=None if ad is None else ad.target_quantile,
                adaptive_learning_rate=None if ad is None else ad.learning_rate,
                adaptive_count_stddev=None if ad is None else ad.count_stddev,
                target_epsilon=dp.target_epsilon,
            )
        except DPConfigError as error:
            raise ConfigError(f"federated.dp: refused: {error}") from error
        # K, the fixed denominator: the expected number of clients per round.
        self.expected_clients = self.q * self.population if self.sampling == "poisson" else self.clients_per_round
        self.max_clients = (fl.poisson_max_clients(self.population, self.q) if self.sampling == "poisson"
                            else self.clients_per_round)
        self.target_epsilon = dp.target_epsilon
        self.ledger = self._ledger()
        self.last_round = f.rounds
        if dp.target_epsilon is not None:
            self.last_round = min(f.rounds, max_rounds_within(
                dp.target_epsilon, dp.noise_multiplier, dp.sampling, q=self._q(),
                clients_per_round=self.clients_per_round, population=self.population, delta=self.delta,
                accountant=dp.accountant, max_rounds=f.rounds))

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, population: int) -> Optional["RunPrivacy"]:
        """None without ``federated.dp`` (then ``weighting: uniform`` is the only DP-less check)."""
        if cfg.federated.dp is None:
            return None
        return cls(cfg, population)

    def _q(self) -> Optional[float]:
        return self.q if self.sampling == "poisson" else None

    def _ledger(self) -> PrivacyLedger:
        # dp_accounting logs (via absl) every RDP order whose series does not converge and is
        # skipped; that is expected for small z and large q, and would flood the progress lines.
        logging.getLogger("absl").setLevel(logging.ERROR)
        return PrivacyLedger(self.noise_multiplier, self.sampling, q=self._q(), clients_per_round=self.clients_per_round,
                             population=self.population, delta=self.delta, accountant=self.accountant)

    # -- algorithm and sampling ---------------------------------------------------

    def algorithm(self, base: fl.FederatedAlgorithm) -> DPFedAvg:
        """``base``'s client update, server optimiser and executor with DP aggregation."""
        dp = self.cfg.federated.dp
        aggregator = dp_fedavg_aggregator(dp.clip_norm, dp.noise_multiplier, self.expected_clients, self.adaptive)
        return DPFedAvg(base.client_update, base.server_optimizer, aggregator, base.executor)

    def sample(self, seed: int, round_index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)`` of round ``round_index``: a static ``[max_clients]`` with padding where ``mask`` is false."""
        if self.sampling == "poisson":
            draw = fl.poisson_sample_clients(seed, round_index, self.population, self.q, self.max_clients)
            return draw.ids, draw.mask
        ids = fl.sample_clients(seed, round_index, self.population, self.clients_per_round)
        return ids, np.ones(ids.shape, bool)

    @staticmethod
    def mask_batches(batches: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
        """Padded slots get ``example_weight`` 0: no real token, ``n_k = 0``, so DP aggregation zeroes them."""
        if mask.all():
            return batches
        weight = np.array(batches["example_weight"], copy=True)
        weight[~mask] = 0
        return dict(batches, example_weight=weight)

    # -- accounting ----------------------------------------------------------------

    def restore(self, rounds_done: int) -> None:
        """The ledger after ``rounds_done`` rounds (for ``--resume``)."""
        self.ledger = self._ledger()
        self.ledger.record_rounds(int(rounds_done))

    def record_round(self, row: dict[str, Any], host: dict[str, Any]) -> None:
        """ε after this round into the row's ``dp_*`` fields. The ledger is rebuilt with all rounds
        composed at once, so ε is a function of the round alone and a resumed run reports
        bit-identical values (composing one round at a time sums floats in another order)."""
        self.ledger = self._ledger()
        self.ledger.record_rounds(int(row["round"]))
        row.update(
            dp_epsilon=self.ledger.epsilon(),
            dp_delta=self.delta,
            dp_clip_norm=float(host["clip_norm"]),
            dp_noise_stddev=float(host["noise_stddev"]),
        )

    def summary(self, rounds: int) -> dict[str, Any]:
        """summary.json's ``privacy``: the final (ε, δ) and what they assume."""
        relation = "add/remove one client (Poisson sampling)" if self.sampling == "poisson" else \
            "replace one client (fixed-size sampling without replacement)"
        return {
            "epsilon": self.ledger.epsilon(),
            "delta": self.delta,
            "rounds": int(rounds),
            "guarantee": GUARANTEE.format(relation=relation, accountant=self.accountant.upper()),
            "mechanism": "DP-FedAvg (McMahan et al. 2018), uniform weights, fixed denominator"
                         + (", adaptive clipping (Andrew et al. 2021)" if self.adaptive else ""),
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.cfg.federated.dp.clip_norm,
            "adaptive_clipping": None if self.adaptive is None else self.adaptive._asdict(),
            "sampling": self.sampling,
            "sampling_rate": self._q(),
            "clients_per_round": self.clients_per_round if self.sampling == "fixed" else None,
            "expected_clients": self.expected_clients,
            "population": self.population,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "stopped_at_target": bool(self.target_epsilon is not None and rounds < self.cfg.federated.rounds
                                      and rounds >= self.last_round),
        }


def with_dp(cfg: ExperimentConfig, **dp: Any) -> ExperimentConfig:
    """A copy of ``cfg`` with DP settings (tests, scripts)."""
    from fedjax_fm.config import DPSection

    return cfg.replace(federated=dataclasses.replace(cfg.federated, dp=DPSection(**dp)))
