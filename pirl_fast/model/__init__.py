"""Stage 3: the network, the losses, the memory bank and its fused kernels."""
