"""medsr_dist.train"""
