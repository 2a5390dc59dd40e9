"""pytest benchmarks/ for imm_kernels; `python -m benchmarks.report RUN.json` turns a run into tables and plots."""
