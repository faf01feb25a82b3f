"""The XScheduler: the search space, branch-and-bound, and the planner over them."""
