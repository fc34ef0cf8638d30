"""The contract layer: formats and models every stage shares (search space, cost model, plan, search result, model directory)."""
