"""The SoFT objective: exit sets and weights, the chunked sharded multi-exit loss, ICT heads."""
