"""Machine learning core: data, strategy scripts, fine-tuning and the statistic phi.

Import the submodules directly (``ftps.ml.engine`` pulls in torch); this package only
re-exports the error hierarchy, which needs no torch.
"""

from ftps.ml.strategy import EngineError, StrategyError, WeightsError
from ftps.records import RecordsError

__all__ = ["EngineError", "RecordsError", "StrategyError", "WeightsError"]
