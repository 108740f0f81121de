"""Prune: turn a plan into a smaller model, and make the smaller model compute what the big one did.

The surgery removes channels and blocks for real, through torch-pruning (:mod:`.surgery`, with the cheap masked
equivalent) or by slicing tensors (:mod:`.slicing`, its fast twin for the fitness path). Recovery without training
follows: the closed-form layer refit, the paper's structural distillation (:mod:`.refit`, on the least-squares
blocks of :mod:`.lsq`, and the teacher's Gram matrices that make it cheap enough for every fitness call,
:mod:`.grams`), and BatchNorm re-calibration (:mod:`.bn`). Named after the verb: this is where weights go.
"""
from .bn import recalibrate_bn, restored_bn
from .grams import TeacherGrams
from .refit import ReconstructionWarning, reconstruct
from .slicing import slice_plan
from .surgery import apply_plan, masked

__all__ = ["apply_plan", "masked", "slice_plan", "reconstruct", "ReconstructionWarning", "TeacherGrams",
           "recalibrate_bn", "restored_bn"]
