"""Mixed precision: CLADO candidates, sensitivities, the loss oracle and the budget."""
