"""Sparse autoencoders over the residual stream of every layer: the `MLSAE` module, the codes
it produces, and its architectures (one file each, registered by name in `arch`).

    model.py     MLSAE: standardization, forward passes, checkpoint I/O, splicing
    arch.py      what an architecture is, and the registry of names (`--arch`)
    topk.py, batchtopk.py, token_topk.py, jumprelu.py, matryoshka.py: the architectures
    ops.py       the sparse encoder/decoder kernels every architecture shares
    code.py      SparseCode (what analyses, splicing, the explorer and export consume)
"""

from mlsae.sae.arch import ARCHITECTURES
from mlsae.sae.code import ForwardOutput, SparseCode, TrainOutput, stack_codes
from mlsae.sae.model import MLSAE, NORM_CONVENTIONS, TENSOR_NAMES, arch_name, geometric_median
from mlsae.sae.ops import encoder_topk, sparse_decode

__all__ = ["ARCHITECTURES", "MLSAE", "NORM_CONVENTIONS", "TENSOR_NAMES", "ForwardOutput",
           "SparseCode", "TrainOutput", "arch_name", "encoder_topk", "geometric_median",
           "sparse_decode", "stack_codes"]
