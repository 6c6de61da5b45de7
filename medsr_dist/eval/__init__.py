"""medsr_dist.eval"""
