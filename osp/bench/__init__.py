"""Benchmarks: `osp bench NAME`; each module has main(argv)."""
