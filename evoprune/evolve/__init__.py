"""Evolve: the genetic algorithm that chooses a plan, in DEAP's style.

The operators take individuals and return tuples (:mod:`.operators`); :func:`register` puts them and the
chromosome types on a DEAP toolbox (:mod:`.toolbox`); the fitness scores a plan on held-out images
(:mod:`.fitness`), on one of the engines that run fitness calls in parallel (:mod:`.engines`: a process pool, SCOOP,
Dask). :class:`Search` (:mod:`.loop`) runs the paper's T rounds, each a GA (:mod:`.round`, :mod:`.population`) with
its settings (:mod:`.config`), its budget (:mod:`.budget`), its checkpoint (:mod:`.checkpoint`), its result
(:mod:`.result`) and its report files (:mod:`.report`); the knapsack allocator (:mod:`.knapsack`) seeds it and is
its strongest non-evolutionary rival. Named ``evolve`` rather than ``search`` so that :func:`evoprune.search`, the
function, keeps its name.
"""
from .budget import Budget
from .config import SearchConfig
from .engines import make_map, opened
from .fitness import Evaluator, FitnessConfig
from .loop import Search, search, vary
from .result import SearchResult
from .toolbox import register

__all__ = ["Budget", "search", "Search", "vary", "SearchConfig", "SearchResult", "Evaluator", "FitnessConfig",
           "register", "make_map", "opened"]
