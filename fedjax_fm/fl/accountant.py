"""Client-level (ε, δ) for DP-FedAvg from Google's ``dp_accounting``, and config checks.

What is accounted: each round releases the noisy sum of clipped client updates
(``fl/privacy.py``), a Gaussian mechanism on the sampled clients; ``T`` rounds are
``T``-fold self-composition. One *record* is one *client* (all its data), so the
guarantee is client-level: the distribution of everything the server releases
(the noisy aggregates, hence the model) changes by at most (ε, δ) when one
client's whole dataset is added or removed (Poisson) or replaced (fixed-size).

Sampling, neighbouring relation, event and accountant support:

==========  ====================  ===========================================================  =====  =====
sampling    neighbours            one round's DpEvent                                          RDP    PLD
==========  ====================  ===========================================================  =====  =====
poisson     add/remove one        ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``              yes    yes
fixed       replace one           ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z/2))``  yes    no
==========  ====================  ===========================================================  =====  =====

``GaussianDpEvent``'s multiplier is noise std ÷ L2 sensitivity of the released sum.
Under add/remove-one the sum of clipped updates moves by at most ``C``, so it is
``zC / C = z``. Under replace-one (fixed-size sampling: ``N`` is public and a
neighbour *replaces* a client) it moves by up to ``2C``, so the multiplier is
``z/2`` — fixed-size sampling is accounted honestly, not as if it were Poisson.
(With adaptive clipping ``z`` is the combined multiplier of the update and the
count, see ``fl/privacy.py``; the count's sensitivity doubles too, so ``z/2`` holds.)
dp_accounting's ``PLDAccountant`` has no ``SampledWithoutReplacementDpEvent``;
that combination is refused rather than approximated.

Conversions: ``RdpAccountant.get_epsilon`` uses the tighter RDP → (ε, δ) conversion
of Canonne, Kamath, Steinke (2020) over dp_accounting's default orders; PLD is
numerically near-exact (pessimistic discretisation, interval 1e-4 here).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import dp_accounting
from dp_accounting import NeighboringRelation

Sampling = Literal["poisson", "fixed"]
AccountantKind = Literal["rdp", "pld"]
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")

# PLD discretisation interval: dp_accounting's default. Smaller is tighter and slower.
PLD_DISCRETIZATION = 1e-4


class DPConfigError(ValueError):
    """A DP setting the accountant cannot vouch for; the message names the config key."""


def round_event(
    noise_multiplier: float,
    sampling: Sampling = "poisson",
    *,
    q: float | None = None,
    clients_per_round: int | None = None,
    population: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of one round (see the table in the module docstring)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise DPConfigError(f"federated.dp.noise_multiplier must be finite and > 0, got {noise_multiplier}")
    if sampling == "poisson":
        if q is None or not 0.0 < q <= 1.0:
            raise DPConfigError(f"federated.dp.sampling_rate must be in (0, 1] for Poisson sampling, got {q}")
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    if sampling == "fixed":
        if population is None or population <= 0:
            raise DPConfigError(f"federated.num_clients must be positive, got {population}")
        if clients_per_round is None or not 0 < clients_per_round <= population:
            raise DPConfigError(
                f"federated.clients_per_round must be in [1, num_clients={population}], got {clients_per_round}"
            )
        return dp_accounting.SampledWithoutReplacementDpEvent(
            population, clients_per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2.0)
        )
    raise DPConfigError(f"federated.dp.sampling must be one of {SAMPLINGS}, got {sampling!r}")


def make_accountant(accountant: AccountantKind, sampling: Sampling) -> dp_accounting.PrivacyAccountant:
    """An empty dp_accounting accountant with the neighbouring relation ``sampling`` needs."""
    if sampling not in SAMPLINGS:
        raise DPConfigError(f"federated.dp.sampling must be one of {SAMPLINGS}, got {sampling!r}")
    relation = NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson" else NeighboringRelation.REPLACE_ONE
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    if accountant == "pld":
        if sampling == "fixed":
            raise DPConfigError(
                "federated.dp.accountant 'pld' does not support federated.dp.sampling 'fixed': dp_accounting's "
                "PLDAccountant has no SampledWithoutReplacementDpEvent; use accountant 'rdp' or Poisson sampling"
            )
        return dp_accounting.pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
    raise DPConfigError(f"federated.dp.accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _checked_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise DPConfigError(f"federated.dp.delta must be in (0, 1), got {delta}")
    return delta


class PrivacyLedger:
    """Incremental accounting: call :meth:`record_rounds` after each round, read :meth:`epsilon`.

    Holds a dp_accounting accountant and composes one round's event at a time, so
    ``epsilon()`` after round ``t`` is the guarantee of the first ``t`` rounds.
    For a resumed run, build a fresh ledger and ``record_rounds(t)`` once: the
    result equals composing round by round (self-composition is exact in both
    accountants, up to PLD's discretisation).
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling: Sampling = "poisson",
        *,
        q: float | None = None,
        clients_per_round: int | None = None,
        population: int | None = None,
        delta: float,
        accountant: AccountantKind = "rdp",
    ):
        self.event = round_event(
            noise_multiplier, sampling, q=q, clients_per_round=clients_per_round, population=population
        )
        self.delta = _checked_delta(delta)
        self._accountant = make_accountant(accountant, sampling)
        if not self._accountant.supports(self.event):  # belt and braces: dp_accounting's own verdict
            raise DPConfigError(
                f"federated.dp.accountant {accountant!r} does not support the event {self.event} "
                f"(federated.dp.sampling {sampling!r})"
            )
        self.rounds = 0

    def record_rounds(self, count: int = 1) -> None:
        """Compose ``count`` more rounds."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count:
            self._accountant.compose(self.event, count)
            self.rounds += count

    def epsilon(self) -> float:
        """ε at the ledger's δ for the rounds recorded so far (0 before any round)."""
        return 0.0 if self.rounds == 0 else float(self._accountant.get_epsilon(self.delta))

    @property
    def accountant(self) -> dp_accounting.PrivacyAccountant:
        """The underlying dp_accounting accountant (e.g. ``.rdp`` and ``.orders`` for RDP)."""
        return self._accountant


def epsilon(
    noise_multiplier: float,
    sampling: Sampling = "poisson",
    *,
    q: float | None = None,
    clients_per_round: int | None = None,
    population: int | None = None,
    rounds: int,
    delta: float,
    accountant: AccountantKind = "rdp",
) -> float:
    """Client-level ε after ``rounds`` rounds at ``delta``.

    ``noise_multiplier`` is ``z`` (with adaptive clipping the combined multiplier,
    not ``z_Δ``). Poisson: give ``q``; fixed-size: give ``clients_per_round`` (K)
    and ``population`` (N).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    ledger = PrivacyLedger(
        noise_multiplier,
        sampling,
        q=q,
        clients_per_round=clients_per_round,
        population=population,
        delta=delta,
        accountant=accountant,
    )
    ledger.record_rounds(rounds)
    return ledger.epsilon()


def max_rounds_within(
    target_epsilon: float,
    noise_multiplier: float,
    sampling: Sampling = "poisson",
    *,
    q: float | None = None,
    clients_per_round: int | None = None,
    population: int | None = None,
    delta: float,
    accountant: AccountantKind = "rdp",
    max_rounds: int = 100_000,
) -> int:
    """The most rounds ``T ≤ max_rounds`` with ``epsilon(T) ≤ target_epsilon``: stop training there.

    ε is non-decreasing in ``T``, so a bisection finds it with ``O(log max_rounds)``
    accountant evaluations. Returns 0 when even one round exceeds the budget.
    """
    if not target_epsilon > 0:
        raise DPConfigError(f"federated.dp.target_epsilon must be > 0, got {target_epsilon}")

    def eps(rounds: int) -> float:
        return epsilon(
            noise_multiplier,
            sampling,
            q=q,
            clients_per_round=clients_per_round,
            population=population,
            rounds=rounds,
            delta=delta,
            accountant=accountant,
        )

    if eps(max_rounds) <= target_epsilon:
        return max_rounds
    lo, hi = 0, max_rounds  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def validate_dp_config(
    *,
    noise_multiplier: float,
    clip_norm: float,
    delta: float,
    population: int,
    sampling: str = "poisson",
    q: float | None = None,
    clients_per_round: int | None = None,
    weighting: str = "uniform",
    accountant: str = "rdp",
    min_clients: int = 1,
    adaptive_target_quantile: float | None = None,
    adaptive_learning_rate: float | None = None,
    adaptive_count_stddev: float | None = None,
    target_epsilon: float | None = None,
) -> None:
    """Refuse DP settings that break the accountant's assumptions (raises :class:`DPConfigError`).

    Each message names the config key and the reason. Adaptive clipping is on when
    ``adaptive_count_stddev`` is given.
    """
    if weighting != "uniform":
        raise DPConfigError(
            f"federated.weighting must be 'uniform' under DP, got {weighting!r}: example weights make a "
            "client's influence grow with its (private) example count, so the sensitivity C/K no longer holds"
        )
    if sampling not in SAMPLINGS:
        raise DPConfigError(
            f"federated.dp.sampling must be one of {SAMPLINGS}, got {sampling!r}: the accountant models only "
            "Poisson sampling and fixed-size sampling without replacement"
        )
    if accountant not in ACCOUNTANTS:
        raise DPConfigError(f"federated.dp.accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if isinstance(population, bool) or not (isinstance(population, numbers.Integral) and population > 0):
        raise DPConfigError(f"federated.num_clients must be a positive integer, got {population!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise DPConfigError(
            f"federated.dp.noise_multiplier must be finite and > 0, got {noise_multiplier}: without noise "
            "there is no differential privacy"
        )
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise DPConfigError(
            f"federated.dp.clip_norm must be finite and > 0, got {clip_norm}: the clip norm bounds each "
            "client's influence (the sensitivity)"
        )
    if not 0.0 < delta < 1.0 / population:
        raise DPConfigError(
            f"federated.dp.delta must be in (0, 1/num_clients = {1.0 / population:.3g}), got {delta}: with "
            "δ ≥ 1/N a mechanism that publishes one whole client's data at random satisfies the guarantee"
        )
    if min_clients != 1:
        raise DPConfigError(
            f"federated.min_clients must be 1 under DP, got {min_clients}: skipping a round because too few "
            "clients were valid is an un-noised decision on private data; DP rounds are always applied"
        )
    if target_epsilon is not None and not target_epsilon > 0:
        raise DPConfigError(f"federated.dp.target_epsilon must be > 0, got {target_epsilon}")
    if adaptive_count_stddev is not None:
        if adaptive_target_quantile is None or not 0.0 < adaptive_target_quantile < 1.0:
            raise DPConfigError(
                f"federated.dp.adaptive_clipping.target_quantile must be in (0, 1), got {adaptive_target_quantile}"
            )
        if adaptive_learning_rate is None or not adaptive_learning_rate > 0:
            raise DPConfigError(
                f"federated.dp.adaptive_clipping.learning_rate must be > 0, got {adaptive_learning_rate}"
            )
        if not 2.0 * adaptive_count_stddev > noise_multiplier:
            raise DPConfigError(
                f"federated.dp.adaptive_clipping.count_stddev must exceed noise_multiplier/2 = "
                f"{noise_multiplier / 2}, got {adaptive_count_stddev}: the update noise is "
                "z_Δ = (z⁻² − (2σ_b)⁻²)^(−½), which needs 2σ_b > z"
            )
    # Sampling parameters, and that the chosen accountant supports the event.
    event = round_event(noise_multiplier, sampling, q=q, clients_per_round=clients_per_round, population=population)  # type: ignore[arg-type]
    if not make_accountant(accountant, sampling).supports(event):  # type: ignore[arg-type]
        raise DPConfigError(
            f"federated.dp.accountant {accountant!r} does not support federated.dp.sampling {sampling!r}"
        )
