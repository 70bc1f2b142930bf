"""fewstep.core.cache"""
