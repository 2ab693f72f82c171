"""The parts of benchmarks/pipeline_vs_loop.py: the sampler, the loop and the pipeline runs."""
