"""The Triton backend: imm_kernels.triton.mmd and imm_kernels.triton.interpolant register their ops with
imm_kernels._dispatch when imported (on first use of backend="triton"). On CPU tensors the kernels run
under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)."""
