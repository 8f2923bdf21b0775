"""Fast CPU implementations of the ops, with the same names, signatures and results as gpucnn.ops.

gpucnn.ops holds the validation, the dispatch and the plain NumPy reference (the oracle);
gpucnn.cuda the GPU launchers; this package the fast NumPy path the dispatch picks for
NumPy arrays. Each module is named after its op family (conv, pool, activation) and
defines only the functions it makes faster; the dispatch uses the reference for the rest.

What makes it fast (measured; see bench/results/ and ../shared/design/fast-numpy-cpu.md):
- activations stay in a channel-height-width-batch ("CHWN") memory order, returned as
  (N, C, H, W)-shaped views, so im2col, pooling and ReLU copy long contiguous runs;
- the work is cut into fixed chunks (from the shapes alone) that a small thread pool
  shares out (NumPy and BLAS release the GIL), BLAS set to one thread meanwhile, and
  partial sums are added in chunk order: seeded runs repeat bit for bit, whatever the
  number of threads;
- freed memory stays in the process (gpucnn.cpu.memory), so each step's fresh arrays do not
  page-fault;
- on two cores the Trainer's step computes half the batch in a worker process (gpucnn.cpu.split):
  two interpreters do not wait on each other's lock, two threads of one do.
"""
