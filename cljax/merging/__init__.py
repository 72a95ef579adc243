"""Model merging over parameter pytrees: task vectors, static merges, continual merges, and
the one registry of merge methods (`REGISTRY`, `get`, `check_names`, `merge`, `continual_merge`,
`per_task_merge`).

The baselines live in their modules (`slerp`, `model_stock`, `sparsify`, `tsv`, `iso`,
`consensus`, `wudi`, `emr`, `regmean`, `adamerging`, `frank_wolfe_soft`) and are reached by name
through the registry; their functions are not re-exported here, as most share their module's
name (``cljax.merging.tsv`` stays the module).

Pure algorithms only: the `cljax-merge` checkpoint tool lives in `cljax.merge_io`.
"""

from cljax.merging.continual import ContinualMerge
from cljax.merging.continual import continual_average
from cljax.merging.continual import continual_task_arithmetic
from cljax.merging.continual import continual_ties
from cljax.merging.continual import mass_rank
from cljax.merging.continual import opcm
from cljax.merging.continual import opcm_projection
from cljax.merging.continual import OPCMState
from cljax.merging.continual import split_index
from cljax.merging.continual import SumState
from cljax.merging.continual import TiesState
from cljax.merging.registry import check_names
from cljax.merging.registry import continual_merge
from cljax.merging.registry import emr_per_task
from cljax.merging.registry import get
from cljax.merging.registry import merge
from cljax.merging.registry import MergeMethod
from cljax.merging.registry import per_task_merge
from cljax.merging.registry import REGISTRY
from cljax.merging.static import average
from cljax.merging.static import dare
from cljax.merging.static import dare_task_arithmetic
from cljax.merging.static import dare_task_vectors
from cljax.merging.static import dare_ties
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
    'ContinualMerge', 'MergeMethod', 'OPCMState', 'REGISTRY', 'SumState', 'TiesState',
    'FrankWolfeInfo', 'apply', 'average', 'check_finite', 'check_names', 'check_same_structure',
    'continual_average', 'continual_merge', 'continual_task_arithmetic', 'continual_ties',
    'dare', 'dare_task_arithmetic', 'dare_task_vectors', 'dare_ties', 'emr_per_task', 'fisher',
    'frank_wolfe', 'frank_wolfe_with_info', 'get', 'kth_largest_magnitude', 'leaf_names',
    'magmax', 'mass_rank', 'merge', 'merge_mask', 'opcm', 'opcm_projection', 'path_name',
    'per_task_merge', 'split_index', 'task_arithmetic', 'task_vector', 'ties',
    'ties_task_vectors', 'trim_task_vector',
]
