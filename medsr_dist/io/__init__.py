"""medsr_dist.io"""
