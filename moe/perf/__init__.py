"""Performance: FLOP counts, timing, benchmarks, calibration and the projection of full-scale cost.

flops.py (parameters and FLOPs per token), timing.py (timing rules, matmul peak, memory),
results.py (result records and files), device_peaks.py (datasheet peaks), components.py (a
decoder's pieces, one at a time), bench.py (`moe bench`), calibrate.py and projection.py
(`moe calibrate`), published.py (published and claimed figures to compare with).
"""
