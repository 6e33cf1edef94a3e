"""RLHF on top of hybrid_engine: data pipeline, SFT (step 1), reward model (step 2).

hybrid_engine never imports this package; this package imports hybrid_engine.
"""
