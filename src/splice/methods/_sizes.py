"""Block and chunk sizes of the methods' loops, in one place.

Each is a number of elements handled at a time.  Smaller keeps a loop's working
set in the CPU caches; larger pays the per-block overhead (Python steps, torch
calls) fewer times.  None changes a result's bits: every path that uses them is
tested bit-identical to the plain whole-tensor path, or is exact.
"""

# The torch-chunked task arithmetic / TIES path (``_chunked``, when numba is absent):
# about eight 256 KiB float32 buffers stay in L2, and a chunk costs a dozen torch calls
# (a few microseconds each), which smaller chunks would multiply.
TORCH_CHUNK = 1 << 16

# The fused numba kernels (``_kernels``): a block's five float32 accumulators and two bit
# buffers (~450 KiB) stay in L2 while the K models stream through it; smaller blocks
# reload the base more often and shorten the vectorized loops.
KERNEL_BLOCK = 1 << 14

# sce's variance across models (``sce``): K * 4 MiB of float32 stacked at a time instead
# of K whole task vectors; smaller chunks mean more ``torch.var`` calls.
VARIANCE_CHUNK = 1 << 20

# Thread-count-independent reductions (``_reduce``): a whole-tensor sum is taken as one
# partial sum per block (torch computes each on one thread) plus an exact sum of the
# partials.  Must stay below torch's intra-op grain (32768) so a single block is never
# split across threads; larger blocks mean fewer partials to add in Python.
SUM_BLOCK = 1 << 14

# DARE's L1 rescale on the chunked path (``_chunked``): the delta and its kept part are made
# this many elements at a time (two float32 buffers, 2 MiB) for their norms.  Must be a
# multiple of SUM_BLOCK so the norms' per-block partials are the whole-tensor path's;
# smaller means more torch calls per tensor.
RESCALE_CHUNK = 16 * SUM_BLOCK

# DELLA on the chunked path (``_chunked.della_chunked``): rows are ranked and dropped this
# many elements at a time (whole rows; at least one).  The argsort's int64 indices and a
# few float32 buffers of this size stay in L2; smaller means more torch calls per tensor.
DELLA_BLOCK = 1 << 16

# DELLA's per-row magnitude ranks (``_kernels._della_rows``): the radix sort's digit width, in
# bits. A row's varying bits are split into equal digits of at most this many; a digit costs a
# counting pass over the row plus 2**bits histogram bins to clear and sum (16 KiB at 12, in L1).
# Smaller takes more passes (fine-tune deltas vary in ~22 bits: two passes at 11 or 12); larger
# spends more on bins than on the row (768 columns). Not a size in elements, and no result depends on it.
RANK_DIGIT_BITS = 12

# Streaming reductions (slerp, model_stock): the inputs are upcast, multiplied and reduced this
# many elements at a time, then combined in a second pass of the same chunks.  A multiple of
# SUM_BLOCK, so the per-block partial sums are the whole tensor's; a handful of float32
# buffers of this size (1 MiB each) stay in L2; smaller means more torch calls.
STREAM_CHUNK = 16 * SUM_BLOCK
