"""Float comparison bounds shared by the model tests, each justified by its arithmetic."""

# Parity with PyTorch in float32 (eps 1.2e-7): both sides round every sum of up to a few
# dozen products in their own order, and LayerNorm rescales the error with the values, so
# outputs of size 1-5 agree to ~2e-6 (measured); 1e-4 relative, plus 1e-4 absolute for
# entries near zero (whose error follows the size of the summed terms), leaves 50x.
PARITY = {"rtol": 1e-4, "atol": 1e-4}

# bfloat16 against float32: 8 significant bits (relative step 2^-8 = 0.4%), rounded at
# every layer's inputs and outputs, so activations of size 1-5 drift by a few such steps
# (0.06 at most, measured); a bug would move them by their own size.
BF16 = {"rtol": 0.05, "atol": 0.15}
