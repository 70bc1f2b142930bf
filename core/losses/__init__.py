"""fewstep.core.losses"""
