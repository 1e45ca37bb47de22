"""Eight posteriordb posteriors ported to Pyro (``/work/shared/posteriordb``, see its README),
with their reference draws; :func:`load` returns a :class:`~.common.Posterior` by short name.

``python -m benchmarks.posteriordb.validate`` checks each port against its reference draws;
``python -m benchmarks.posteriordb.run`` fits the autoguides and writes the table."""

from . import arma, earnings, gp_regr, hmm, kilpisjarvi, nes, sblrc
from .common import Posterior

#: short name -> constructor, fastest first (time per model evaluation)
POSTERIORS = {
    "kilpisjarvi": kilpisjarvi.posterior,
    "gp_regr": gp_regr.posterior,
    "sblrc": sblrc.posterior,
    "earnings": earnings.posterior,
    "nes": nes.posterior,
    "hmm_example": hmm.example,
    "arma": arma.posterior,
    "hmm_drive": hmm.drive,
}


def load(name: str) -> Posterior:
    if name not in POSTERIORS:
        raise ValueError(f"unknown posterior {name!r}; known: {', '.join(POSTERIORS)}")
    return POSTERIORS[name]()
