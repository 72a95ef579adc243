"""Model merging over parameter pytrees: task vectors, static merges, continual merges."""

from cljax.merging.continual import ContinualMerge
from cljax.merging.continual import continual_average
from cljax.merging.continual import continual_task_arithmetic
from cljax.merging.continual import continual_ties
from cljax.merging.continual import mass_rank
from cljax.merging.continual import opcm
from cljax.merging.continual import opcm_projection
from cljax.merging.continual import OPCMState
from cljax.merging.continual import SumState
from cljax.merging.continual import TiesState
from cljax.merging.static import average
from cljax.merging.static import dare
from cljax.merging.static import dare_task_vectors
from cljax.merging.static import fisher
from cljax.merging.static import frank_wolfe
from cljax.merging.static import frank_wolfe_with_info
from cljax.merging.static import FrankWolfeInfo
from cljax.merging.static import kth_largest_magnitude
from cljax.merging.static import magmax
from cljax.merging.static import task_arithmetic
from cljax.merging.static import ties
from cljax.merging.static import ties_task_vectors
from cljax.merging.static import trim_task_vector
from cljax.merging.task_vectors import apply
from cljax.merging.task_vectors import leaf_names
from cljax.merging.task_vectors import merge_mask
from cljax.merging.task_vectors import path_name
from cljax.merging.task_vectors import task_vector
from cljax.merging.validation import check_finite
from cljax.merging.validation import check_same_structure

__all__ = [
    'ContinualMerge', 'OPCMState', 'SumState', 'TiesState', 'FrankWolfeInfo',
    'apply', 'average', 'check_finite', 'check_same_structure', 'continual_average',
    'continual_task_arithmetic', 'continual_ties', 'dare', 'dare_task_vectors', 'fisher',
    'frank_wolfe', 'frank_wolfe_with_info', 'kth_largest_magnitude', 'leaf_names', 'magmax',
    'mass_rank', 'merge_mask', 'opcm', 'opcm_projection', 'path_name', 'task_arithmetic',
    'task_vector', 'ties', 'ties_task_vectors', 'trim_task_vector',
]
