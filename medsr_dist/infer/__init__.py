"""medsr_dist.infer"""
