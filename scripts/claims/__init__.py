"""The seed article's three MoE claims, measured on our own runs (`scripts/claims.py`).

One module per claim (balance, layering, capacity), each with the same four parts: the
configs it trains, `measure(setup) -> dict` (JSON-ready numbers and series), `verdict(numbers)`
(the stated rule applied to those numbers) and `plot(numbers, folder)`; `report` writes
docs/claims.md from the three results. `common` holds the run folder, training and the
load statistics they share.
"""
