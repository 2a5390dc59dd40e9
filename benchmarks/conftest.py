"""Benchmarks see the installed imm_kernels as users do; one torch thread unless IMM_BENCH_THREADS says more
(the thread count is part of every CPU result)."""

import os

import torch

torch.set_num_threads(int(os.environ.get("IMM_BENCH_THREADS", "1")))
