"""Every worked example of the lectures (llmsys_lab.lecture), reproduced by the kit's own code."""
from llmsys_lab import lecture


def test_examples_have_sources():
    for ex in lecture.EXAMPLES.values():
        assert ex.source and ex.slide, ex.name


# ---- serving: KV cache, continuous batching, PagedAttention, goodput, Orca ----


# ---- estimators: parameters, FLOPs, training memory, Chinchilla ----


# ---- compute: attention, FLOPs, memory, scaling laws, FlashAttention, latency ----
