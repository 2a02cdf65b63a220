"""vlsi: VLsI (Verbalized Layers-to-Interactions, arXiv 2412.01822).

Layer-wise distillation from a large vision-language model (teacher) into a small one
(student) in three steps: verbalization, interaction with adaptive layer matching, SFT.
See ``SPEC.md`` in the project's shared folder and the README for the choices made here.
"""

__version__ = "0.1.0"

from vlsi.errors import VlsiError

__all__ = ["VlsiError", "__version__"]
