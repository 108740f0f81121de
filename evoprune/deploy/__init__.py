"""Deploy: the pruned model where it will run, and what it costs there.

Export to the deployment formats, each reloaded and checked before it counts (:mod:`.exporter`: ``torch.export``,
ONNX, the Python ``.pt``, TorchScript on request), the runtimes and their clocks (:mod:`.runtime`: eager torch and
ONNX Runtime), and a latency table that predicts any plan's latency on a runtime from per-layer timings
(:mod:`.latency`, timed by :mod:`.layer_timing`), the cost the search spends when the budget is milliseconds.
Named for the last step of the pipeline; the search imports the latency table from here, never the reverse.
"""
from .exporter import DEFAULT_FORMATS, FORMATS, export, model_card
from .latency import LatencyTable
from .runtime import LatencyWarning, Timing, measure

__all__ = ["export", "model_card", "FORMATS", "DEFAULT_FORMATS", "LatencyTable", "LatencyWarning", "Timing",
           "measure"]
