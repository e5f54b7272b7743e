"""Tied weights held equal by averaging after every step (the lecture's Section 3).

The home of these names is :mod:`cnnkit.nn.tying`, beside the untied layer they tie: this
module is its old door and names the very same objects (``TieGroups``, ``project_``,
``tie_after_step``, ``convolution_groups``, ...).
"""

from cnnkit.nn.tying import *  # noqa: F403 (every name of the home, re-exported)
from cnnkit.nn.tying import __all__  # noqa: F401
