"""fewstep.core.guidance"""
