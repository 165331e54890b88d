"""graphsurg -- surgical fine-tuning for broken neural networks.

diagnose -> plan -> operate -> verify, on torch.fx graphs and ONNX models.
"""

from ._callback import SurgeryCallback as SurgeryCallback
from ._certificates import Certificates as Certificates
from ._config import DiagnoseConfig as DiagnoseConfig
from ._diagnose import diagnose as diagnose
from ._errors import BadInputError as BadInputError
from ._errors import GraphsurgError as GraphsurgError
from ._monitor import Monitor as Monitor
from ._operate import SurgeryResult as SurgeryResult
from ._operate import operate as operate
from ._operate import reset_optimizer_state as reset_optimizer_state
from ._plan import Schema as Schema
from ._plan import SurgeryFailed as SurgeryFailed
from ._plan import SurgeryPlan as SurgeryPlan
from ._plan import plan as plan
from ._problems import PROBLEM_KINDS as PROBLEM_KINDS
from ._problems import Diagnosis as Diagnosis
from ._problems import LayerReport as LayerReport
from ._problems import Problem as Problem
from ._problems import Site as Site
from .library import Library as Library
from .library import Replacement as Replacement
from .library import default_library as default_library

__version__ = "0.1.0"

__all__ = [
    "PROBLEM_KINDS",
    "Certificates",
    "DiagnoseConfig",
    "Diagnosis",
    "LayerReport",
    "Problem",
    "Site",
    "BadInputError",
    "GraphsurgError",
    "diagnose",
    "__version__",
        "Library",
    "Replacement",
    "Schema",
    "SurgeryFailed",
    "SurgeryPlan",
    "SurgeryResult",
    "default_library",
    "operate",
    "plan",
    "reset_optimizer_state",
        "Monitor",
    "SurgeryCallback",
]
