"""``python -m cmdcl_jax.report``: the paper's figures from a trained run's workdir.

``split_outputs`` runs the model over a split, ``figure_data`` turns its outputs and the
run's logs into each figure's numbers, ``plots`` draws them, ``__main__`` ties them up.
"""
