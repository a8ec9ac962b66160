"""Import every module that registers an explanation method (see :mod:`voxplain.explain.api`)."""

from voxplain.explain import cam as cam  # noqa: F401
from voxplain.explain import gradients as gradients  # noqa: F401
from voxplain.explain import lrp as lrp  # noqa: F401
from voxplain.explain import cyce as cyce  # noqa: F401
