"""medsr_dist.models"""
