"""fewstep.core.export"""
