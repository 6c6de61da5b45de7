"""medsr_dist.data"""
