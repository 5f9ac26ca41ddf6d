"""Scaling laws, lesson 11 (lecture 003): the laws as formulas (laws), fitting them to runs the Chinchilla way
(fit), and the family of small models trained on the bundled text that the fits are made from (family)."""
from .fit import (Fit, IsoFLOP, bootstrap_fits, fit_chinchilla, isoflop_exponents, isoflop_profiles,  # noqa: F401
                  spread)
from .laws import (CHINCHILLA, KAPLAN_2020, SLIDE_LAW, ChinchillaLaw, compute_optimal_grid,  # noqa: F401
                   fit_power_law, kaplan_loss, mean_estimator_error, rosenfeld_error)
