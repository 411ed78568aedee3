"""What a user runs to measure mla_patch: the kernel grid, generate(), the card's ceilings, the FlashInfer
peer, a model split over GPUs; and the timing, input and model helpers they share."""
