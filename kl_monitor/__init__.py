"""kl_monitor: forward and reverse KL diagnostics for PyTorch Lightning.

Forward KL D(P‖Q) (reference P, model Q) is large when the model misses mass the
reference has: a coverage gap. Reverse KL D(Q‖P) is large when the model puts mass
where the reference has none, and stays small when the model drops modes. Always
look at both.
"""

from .alerting import AlertEngine, AlertThresholds, Change, Evidence
from .binned import BinnedKLResult, binned_kl, fit_cells
from .callback import KLAlertWarning, KLMonitor, KLMonitorWarning
from .detectors import ALERT_KINDS, Alert, AlertRules, CusumDetector, Evaluation
from .estimators import (
    CategoricalKLResult,
    categorical_kl,
    categorical_kl_rows,
    iw_reverse_kl,
    mc_kl,
)
from .generation import Generation, hf_generation_inputs, sample_continuations
from .inputs import INPUT_KINDS, KLInputs
from .knn import KNNKLResult, knn_kl
from .metrics import CategoricalKL, MonteCarloKL, SampledKL
from .pairing import PairedRows
from .results import (
    CategoricalResult,
    DirectionEstimate,
    GroupEstimate,
    KLResult,
    MonteCarloResult,
    RowSource,
    SampledResult,
    SamplesResult,
)
from .sample_metrics import KNNKL, BinnedKL
from .sequences import SamplingTransform, SequenceKLEstimate, sequence_kl
from .stats import IWEstimate, KLEstimate, KLStats, pareto_tail_index

__version__ = "0.1.0"

__all__ = [
    "ALERT_KINDS",
    "INPUT_KINDS",
    "Alert",
    "AlertEngine",
    "AlertRules",
    "AlertThresholds",
    "BinnedKL",
    "BinnedKLResult",
    "CategoricalKL",
    "CategoricalKLResult",
    "CategoricalResult",
    "Change",
    "CusumDetector",
    "DirectionEstimate",
    "Evaluation",
    "Evidence",
    "Generation",
    "GroupEstimate",
    "IWEstimate",
    "KLAlertWarning",
    "KLEstimate",
    "KLInputs",
    "KLMonitor",
    "KLMonitorWarning",
    "KLResult",
    "KLStats",
    "KNNKL",
    "KNNKLResult",
    "MonteCarloKL",
    "MonteCarloResult",
    "PairedRows",
    "RowSource",
    "SampledKL",
    "SampledResult",
    "SamplingTransform",
    "SequenceKLEstimate",
    "SamplesResult",
    "binned_kl",
    "categorical_kl",
    "categorical_kl_rows",
    "hf_generation_inputs",
    "fit_cells",
    "iw_reverse_kl",
    "knn_kl",
    "mc_kl",
    "pareto_tail_index",
    "sample_continuations",
    "sequence_kl",
]
