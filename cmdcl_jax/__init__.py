"""CMDCL: Cross-Modal Dual-Causal Learning for long-term action recognition, in JAX."""
