"""Energy and efficiency: power sampling backends, metering of compiled calls, FLOPs/MFU, communication.

See ``docs/energy.md`` for every metric's definition. The command-line benchmarks
live in ``fedjax_fm.energy.bench`` (imported by the CLI only: it pulls in the model).
"""

from fedjax_fm.energy.base import (
    ConstantBackend,
    NoneBackend,
    PowerBackend,
    PowerBackendUnavailable,
    PowerSample,
    source_label,
)
from fedjax_fm.energy.comm import (
    CommCost,
    NetworkProfile,
    client_comm_cost,
    granularity,
    load_network_profiles,
    network_profile,
    round_comm_cost,
)
from fedjax_fm.energy.detect import Detection, detect_backend, make_backend
from fedjax_fm.energy.meter import CallRecord, Meter, make_record, safe_div, sum_records
from fedjax_fm.energy.peaks import DEVICE_PEAKS, PeakFlops, lookup_peak, measure_matmul_peak, resolve_peak
from fedjax_fm.energy.sampler import PowerSampler, PowerTrace

__all__ = [
    "CallRecord", "CommCost", "ConstantBackend", "DEVICE_PEAKS", "Detection", "Meter", "NetworkProfile",
    "NoneBackend", "PeakFlops", "PowerBackend", "PowerBackendUnavailable", "PowerSample", "PowerSampler",
    "PowerTrace", "client_comm_cost", "detect_backend", "granularity", "load_network_profiles", "lookup_peak",
    "make_backend", "make_record", "measure_matmul_peak", "network_profile", "resolve_peak", "round_comm_cost",
    "safe_div", "source_label", "sum_records",
]
