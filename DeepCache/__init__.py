"""DeepCache: training-free acceleration of diffusers U-Net and transformer pipelines by caching deep features.

Example (see :class:`DeepCacheSDHelper` for ``enable()``/``disable()``)::

    from DeepCache import DeepCacheSDHelper
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    with helper:                                   # cached inside the block only
        image = pipe("a photo of an astronaut on a moon").images[0]
"""

__version__ = "0.2.0"

from .engine import NAN_PLACEHOLDERS_ENV, DeepCacheWarning  # noqa: E402
from .helper import DeepCacheSDHelper  # noqa: E402

#: The same helper under a family-neutral name (U-Nets and transformers alike).
DeepCacheHelper = DeepCacheSDHelper
from .engine.unet.layout import UNetLayout, branch_table, retrieval_plan  # noqa: E402
from .schedules.params import CacheParams  # noqa: E402
from .schedules.schedule import non_uniform_full_steps, schedule_pattern  # noqa: E402

__all__ = [
    "DeepCacheHelper",
    "DeepCacheSDHelper",
    "DeepCacheWarning",
    "NAN_PLACEHOLDERS_ENV",
    "CacheParams",
    "UNetLayout",
    "branch_table",
    "non_uniform_full_steps",
    "retrieval_plan",
    "schedule_pattern",
    "__version__",
]
