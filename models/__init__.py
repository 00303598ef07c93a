"""flopwise.models"""
