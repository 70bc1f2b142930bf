"""fewstep.core.attention"""
