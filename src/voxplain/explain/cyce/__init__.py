"""CyCE: cycle-consistent activation-maximisation explanations (Katzmann et al. 2021, paper 3).

- :mod:`~voxplain.explain.cyce.generator` -- U-Net generators G+ and G-;
- :mod:`~voxplain.explain.cyce.discriminator` -- paired multiscale PatchGAN discriminators;
- :mod:`~voxplain.explain.cyce.losses` -- MS-DSSIM, cycle, similarity, activation maximisation;
- :mod:`~voxplain.explain.cyce.training` -- alternating training, checkpoints, convergence;
- :mod:`~voxplain.explain.cyce.relevance` -- R = G+(x) - G-(x), Delta+/-, the ``cyce`` explainer;
- :mod:`~voxplain.evaluate.transfer` -- domain-transfer evaluation (paper 3, 4.1);
- :mod:`~voxplain.steps.cyce` -- the same on a run folder (``voxplain cyce ...``).
"""

from voxplain.explain.cyce.relevance import CyCE, CyCEGenerators

__all__ = ["CyCE", "CyCEGenerators"]
