"""Pure tensor algorithms, no model knowledge: scores, masks, SparseGPT, pools, budgets, allocation,
and the registries of pools and methods (:mod:`.specs`, readable without torch)."""
