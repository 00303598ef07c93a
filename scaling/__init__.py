"""flopwise.scaling"""
